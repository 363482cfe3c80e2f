//! The generic TCP accept stage (the design notes' "generic TCP accept() with a lot of flags set
//! by the listener"): binds a listener with its socket options, which the kernel copies to
//! every socket it accepts, and completes each accepted connection's set-up before the session
//! supervisor takes it over.
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    net::TcpStream,
};

use crate::{config::Listener, sockopt};

/// Binds the listener's socket (non-blocking, SO_REUSEADDR, the configured backlog) with the
/// listener's flags; `rcvbuf`: SO_RCVBUF (`tune.kernel_rcvbuf` when flows may go to the
/// kernel).
///
/// The flags are set once, here: Linux copies TCP_NODELAY, SO_RCVBUF and the keepalive
/// settings of a listening socket to every socket it accepts, so no accepted connection pays a
/// setsockopt for them (the unit tests below check the copy). SO_RCVBUF is thereby in place
/// before the handshake, while the window is the initial one: shrinking the buffer of a socket
/// that already advertised a larger window, at the hand-off to the kernel, duplicated bytes
/// (the segments the old window let in overflow the buffer while the program holds).
pub fn bind(listener: &Listener, rcvbuf: Option<u32>) -> io::Result<Listening> {
    let socket = Socket::new(
        Domain::for_address(listener.bind),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes as usize)?;
    }
    inherited(SockRef::from(&socket), listener)?;
    socket.bind(&listener.bind.into())?;
    socket.listen(backlog(listener))?;
    let socket: std::net::TcpListener = socket.into();
    // SAFETY: the listener owns its fd, which stays open and the same while the AsyncFd owns it.
    let registered = unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)?;
    Ok(Listening(registered))
}

/// The flags accepted sockets inherit: TCP_NODELAY and the keepalive settings.
fn inherited(socket: SockRef<'_>, listener: &Listener) -> io::Result<()> {
    socket.set_nodelay(listener.nodelay)?;
    match &listener.keepalive {
        Some(k) => {
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
            socket.set_tcp_keepalive(&ka)
        }
        None => socket.set_keepalive(false),
    }
}

fn backlog(listener: &Listener) -> i32 {
    listener.backlog.min(i32::MAX as u32) as i32
}

/// A bound listening socket, registered with the runtime that runs its accept loop.
///
/// Not tokio's `TcpListener`: that registers each accepted socket with the accepting runtime,
/// while a session runs on a worker of its own ([`crate::workers`]), whose runtime must own the
/// socket; moving it would cost two more epoll_ctl calls per connection.
pub struct Listening(AsyncFd<std::net::TcpListener>);

impl Listening {
    /// A listening socket another lb process bound and handed over (an upgrade).
    pub fn adopt(fd: std::os::fd::OwnedFd) -> io::Result<Listening> {
        let socket = std::net::TcpListener::from(fd);
        socket.set_nonblocking(true)?;
        // SAFETY: as in `bind`.
        let registered = unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)?;
        Ok(Listening(registered))
    }

    /// Its descriptor, for handing it to a new process (an upgrade).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    /// A reload changed the listener: the flags later connections inherit, and the backlog
    /// (`listen` again on a listening socket only changes its backlog). The address stays.
    pub fn adjust(&self, listener: &Listener) -> io::Result<()> {
        let socket = SockRef::from(self.0.get_ref());
        inherited(socket, listener)?;
        // SAFETY: a plain syscall on the fd this socket owns.
        if unsafe { libc::listen(self.0.as_raw_fd(), backlog(listener)) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A connection already in the accept queue, without waiting (`None`: the queue is empty).
    pub fn try_accept(&self) -> io::Result<Option<(std::net::TcpStream, SocketAddr)>> {
        match SockRef::from(self.0.get_ref()).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) {
            Ok((socket, peer)) => match peer.as_socket() {
                Some(peer) => Ok(Some((socket.into(), peer))),
                None => Ok(None),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits for the next connection: a non-blocking socket registered with no runtime yet.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        let (socket, peer) = self
            .0
            .async_io(Interest::READABLE, |l| {
                SockRef::from(l).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            })
            .await?;
        let peer = peer
            .as_socket()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP peer"))?;
        Ok((socket.into(), peer))
    }
}

/// An accepted client connection, configured.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Where the client meant to go before a REDIRECT (transparent listeners only).
    pub original_dst: Option<SocketAddr>,
    /// What lb tells servers of the client besides `peer` (filled by the next stages).
    pub origin: crate::proxy_header::Origin,
}

/// Completes an accepted connection's set-up on the runtime that will run its session: registers
/// the socket with that runtime (so it must be called there) and, the socket flags having come
/// from the listener ([`bind`]), looks up the original destination of a transparent listener.
pub fn configure(listener: &Listener, stream: std::net::TcpStream, peer: SocketAddr) -> io::Result<Accepted> {
    let stream = TcpStream::from_std(stream)?;
    let original_dst = if listener.transparent {
        sockopt::original_dst(stream.as_fd(), stream.local_addr()?)
    } else {
        None
    };
    Ok(Accepted {
        stream,
        peer,
        original_dst,
        origin: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Keepalive;
    use std::time::Duration;

    fn listener(keepalive: Option<Keepalive>, nodelay: bool) -> Listener {
        Listener {
            name: "t".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            backend: 0,
            backlog: 16,
            nodelay,
            keepalive,
            transparent: true,
            maxconn: 1,
            client_timeout: Duration::from_secs(1),
            http: None,
            tls: None,
            sni_routes: Vec::new(),
            peek_timeout: Duration::from_secs(1),
            accept_proxy: None,
        }
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_flags() {
        let ka = Keepalive {
            idle: Some(Duration::from_secs(42)),
            interval: Some(Duration::from_secs(7)),
            count: Some(3),
        };
        let l = listener(Some(ka), true);
        let socket = bind(&l, Some(1 << 20)).unwrap();
        let _client = TcpStream::connect(socket.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = socket.accept().await.unwrap();
        let a = configure(&l, stream, peer).unwrap();
        let s = SockRef::from(&a.stream);
        assert!(a.stream.nodelay().unwrap());
        // The kernel doubles SO_RCVBUF.
        assert_eq!(s.recv_buffer_size().unwrap(), 2 << 20);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(42));
        assert_eq!(s.keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(s.keepalive_retries().unwrap(), 3);
        // Transparent, but not redirected by netfilter: no original destination.
        assert_eq!(a.original_dst, None);
    }

    #[tokio::test]
    async fn flags_off_stay_off() {
        let l = listener(None, false);
        let socket = bind(&l, None).unwrap();
        let _client = TcpStream::connect(socket.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = socket.accept().await.unwrap();
        let a = configure(&l, stream, peer).unwrap();
        let s = SockRef::from(&a.stream);
        assert!(!a.stream.nodelay().unwrap());
        assert!(!s.keepalive().unwrap());
    }
}
