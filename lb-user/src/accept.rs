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
use tokio::{io::unix::AsyncFd, net::TcpStream};

use crate::{config::Listener, sockopt};

/// Binds the listener's sockets, `count` of them (one per session thread) on the same address
/// with SO_REUSEPORT: the kernel spreads new connections over them, and each thread accepts
/// from its own, so a connection is accepted on the thread that runs its session and never
/// crosses threads (HAProxy's `shards by-thread`). Each is non-blocking, SO_REUSEADDR, with the
/// configured backlog and the listener's flags; `rcvbuf`: SO_RCVBUF (`tune.kernel_rcvbuf`
/// when flows may go to the kernel). On port 0 the first socket's port is the others'.
///
/// The first socket binds without SO_REUSEPORT and sets it only before `listen`: its bind
/// fails, as a plain bind does, when anything holds the address already (another listener of
/// the file, another lb, any process), instead of silently sharing its connections; the
/// others then join it.
///
/// The flags are set once, here: Linux copies TCP_NODELAY, SO_RCVBUF and the keepalive
/// settings of a listening socket to every socket it accepts, so no accepted connection pays a
/// setsockopt for them (the unit tests below check the copy). SO_RCVBUF is thereby in place
/// before the handshake, while the window is the initial one: shrinking the buffer of a socket
/// that already advertised a larger window, at the hand-off to the kernel, duplicated bytes
/// (the segments the old window let in overflow the buffer while the program holds).
pub fn bind(
    listener: &Listener,
    rcvbuf: Option<u32>,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind_at(listener, listener.bind, rcvbuf, false)?;
    let addr = first.local_addr()?;
    let mut sockets = vec![first];
    while sockets.len() < count {
        sockets.push(bind_at(listener, addr, rcvbuf, true)?);
    }
    Ok(sockets)
}

/// `joining`: SO_REUSEPORT before the bind (a socket joining the first's group), else after.
fn bind_at(
    listener: &Listener,
    addr: SocketAddr,
    rcvbuf: Option<u32>,
    joining: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if joining {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes as usize)?;
    }
    inherited(SockRef::from(&socket), listener)?;
    socket.bind(&addr.into())?;
    if !joining {
        socket.set_reuse_port(true)?;
    }
    socket.listen(backlog(listener))?;
    Ok(socket.into())
}

/// A listening socket another lb process bound and handed over (an upgrade), non-blocking.
pub fn adopt(fd: std::os::fd::OwnedFd) -> io::Result<std::net::TcpListener> {
    let socket = std::net::TcpListener::from(fd);
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A reload changed the listener: the flags later connections inherit, and the backlog
/// (`listen` again on a listening socket only changes its backlog). The address stays.
pub fn adjust(socket: &std::net::TcpListener, listener: &Listener) -> io::Result<()> {
    inherited(SockRef::from(socket), listener)?;
    // SAFETY: a plain syscall on the fd this socket owns.
    if unsafe { libc::listen(socket.as_raw_fd(), backlog(listener)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

/// A listening socket, registered with the runtime of the session thread that accepts on it.
///
/// Not tokio's `TcpListener`: the accepted socket is registered with the runtime that runs its
/// session by [`configure`], on that runtime, once.
pub struct Listening(AsyncFd<std::net::TcpListener>);

impl Listening {
    /// Registers `socket` with the current runtime (the thread that will accept on it).
    pub fn register(socket: std::net::TcpListener) -> io::Result<Listening> {
        // SAFETY: the listener owns its fd, which stays open and the same while the AsyncFd
        // owns it.
        let registered = unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)?;
        Ok(Listening(registered))
    }

    pub fn socket(&self) -> &std::net::TcpListener {
        self.0.get_ref()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    /// A connection already in the accept queue, without waiting (`None`: the queue is empty).
    pub fn try_accept(&self) -> io::Result<Option<(std::net::TcpStream, SocketAddr)>> {
        match accept4(self.0.get_ref()) {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until the accept queue may hold a connection; [`Ready::accept`] takes it.
    pub async fn ready(&self) -> io::Result<Ready<'_>> {
        Ok(Ready(self.0.readable().await?))
    }

    /// Waits for the next connection: a non-blocking socket registered with no runtime yet.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            if let Some(c) = self.ready().await?.accept()? {
                return Ok(c);
            }
        }
    }
}

/// A listening socket found readable.
pub struct Ready<'a>(tokio::io::unix::AsyncFdReadyGuard<'a, std::net::TcpListener>);

impl Ready<'_> {
    /// The connection at the head of the queue; `None` when there was none after all (another
    /// thread sharing the socket took it, say): readiness is cleared, so the next wait is for
    /// a new connection.
    pub fn accept(mut self) -> io::Result<Option<(std::net::TcpStream, SocketAddr)>> {
        match self.0.try_io(|l| accept4(l.get_ref())) {
            Ok(Ok(c)) => Ok(Some(c)),
            Ok(Err(e)) => Err(e),
            Err(_would_block) => Ok(None),
        }
    }
}

fn accept4(l: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (socket, peer) = SockRef::from(l).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP peer"))?;
    Ok((socket.into(), peer))
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
        let socket = Listening::register(bind(&l, Some(1 << 20), 1).unwrap().remove(0)).unwrap();
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

    /// A listener's sockets share its address, and the kernel spreads connections over them.
    #[tokio::test]
    async fn a_listeners_sockets_share_its_address_and_its_connections() {
        let mut l = listener(None, true);
        l.backlog = 128;
        let sockets: Vec<Listening> = bind(&l, None, 2)
            .unwrap()
            .into_iter()
            .map(|s| Listening::register(s).unwrap())
            .collect();
        let addr = sockets[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(sockets[1].local_addr().unwrap(), addr);
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut taken = [0; 2];
        for (i, s) in sockets.iter().enumerate() {
            while s.try_accept().unwrap().is_some() {
                taken[i] += 1;
            }
        }
        assert_eq!(taken[0] + taken[1], 64);
        assert!(taken[0] > 0 && taken[1] > 0, "{taken:?}");
        // Nothing else joins them: a second listener on the address fails to bind.
        let mut other = listener(None, true);
        other.bind = addr;
        let err = bind(&other, None, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn flags_off_stay_off() {
        let l = listener(None, false);
        let socket = Listening::register(bind(&l, None, 1).unwrap().remove(0)).unwrap();
        let _client = TcpStream::connect(socket.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = socket.accept().await.unwrap();
        let a = configure(&l, stream, peer).unwrap();
        let s = SockRef::from(&a.stream);
        assert!(!a.stream.nodelay().unwrap());
        assert!(!s.keepalive().unwrap());
    }
}
