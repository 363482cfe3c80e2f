//! The generic TCP accept stage (the design notes' "generic TCP accept() with a lot of flags set
//! by the listener"): binds a listener with its socket options, accepts connections and applies
//! the listener's flags to each accepted socket before the session supervisor takes it over.
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use std::{io, net::SocketAddr, os::fd::AsFd};
use tokio::net::{TcpListener, TcpStream};

use crate::{config::Listener, sockopt};

/// Binds the listener's socket (non-blocking, SO_REUSEADDR, the configured backlog).
pub fn bind(listener: &Listener) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(listener.bind),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listener.bind.into())?;
    socket.listen(listener.backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}

/// An accepted client connection, configured.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Where the client meant to go before a REDIRECT (transparent listeners only).
    pub original_dst: Option<SocketAddr>,
}

/// Applies the listener's flags to a freshly accepted socket.
pub fn configure(listener: &Listener, stream: TcpStream, peer: SocketAddr) -> io::Result<Accepted> {
    stream.set_nodelay(listener.nodelay)?;
    if let Some(k) = &listener.keepalive {
        let mut ka = TcpKeepalive::new();
        if let Some(idle) = k.idle {
            ka = ka.with_time(idle);
        }
        if let Some(interval) = k.interval {
            ka = ka.with_interval(interval);
        }
        if let Some(count) = k.count {
            ka = ka.with_retries(count);
        }
        SockRef::from(&stream).set_tcp_keepalive(&ka)?;
    }
    let original_dst = if listener.transparent {
        sockopt::original_dst(stream.as_fd(), stream.local_addr()?)
    } else {
        None
    };
    Ok(Accepted {
        stream,
        peer,
        original_dst,
    })
}
