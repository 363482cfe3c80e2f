//! Socket calls that std, tokio and socket2 do not offer: socket cookies, TCP_INFO counters,
//! SIOCOUTQ, SO_ORIGINAL_DST, non-blocking raw recv and raw setsockopt. Thin, safe wrappers over libc.
use std::{
    io,
    mem::{size_of, MaybeUninit},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
};

fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: value is a zeroed, writable buffer of len bytes; the kernel writes at most len.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, value.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and T is plain old data (integers only).
    Ok(unsafe { value.assume_init() })
}

/// Sets an int socket option (values above i32::MAX are clamped).
fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: u32) -> io::Result<()> {
    setsockopt(fd, level, name, &(value.min(i32::MAX as u32) as libc::c_int))
}

/// Sets a socket option whose value is `value`'s bytes: an int, a name (`TCP_ULP`), or a
/// kernel struct (`TLS_TX`).
pub fn setsockopt<T: ?Sized>(fd: BorrowedFd<'_>, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: value is valid for reads of its size for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of_val(value) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The socket's cookie: a 64-bit id unique for the kernel's lifetime, the SOCKHASH key.
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The prefix of the kernel's `struct tcp_info` (include/uapi/linux/tcp.h) up to
/// `tcpi_bytes_received`; the kernel copies as much as the caller asks for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpInfo {
    pub state: u8,
    pub ca_state: u8,
    pub retransmits: u8,
    pub probes: u8,
    pub backoff: u8,
    pub options: u8,
    pub wscale: u8,
    pub flags: u8,
    pub rto: u32,
    pub ato: u32,
    pub snd_mss: u32,
    pub rcv_mss: u32,
    pub unacked: u32,
    pub sacked: u32,
    pub lost: u32,
    pub retrans: u32,
    pub fackets: u32,
    /// Milliseconds since new data was last transmitted.
    pub last_data_sent: u32,
    pub last_ack_sent: u32,
    /// Milliseconds since data was last received.
    pub last_data_recv: u32,
    pub last_ack_recv: u32,
    pub pmtu: u32,
    pub rcv_ssthresh: u32,
    pub rtt: u32,
    pub rttvar: u32,
    pub snd_ssthresh: u32,
    pub snd_cwnd: u32,
    pub advmss: u32,
    pub reordering: u32,
    pub rcv_rtt: u32,
    pub rcv_space: u32,
    pub total_retrans: u32,
    pub pacing_rate: u64,
    pub max_pacing_rate: u64,
    /// Bytes the peer acknowledged (an active opener's SYN counts as one).
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

const _: () = assert!(size_of::<TcpInfo>() == 136);

pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    getsockopt::<TcpInfo>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Bytes in the send queue, sent or not, that the peer has not acknowledged (SIOCOUTQ).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_count(fd, libc::TIOCOUTQ)
}

/// Bytes received and not read yet (SIOCINQ), for a socket not in the SOCKHASH.
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_count(fd, libc::FIONREAD)
}

/// An ioctl that reports a byte count as one int (TIOCOUTQ = SIOCOUTQ, FIONREAD = SIOCINQ).
fn ioctl_count(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as u64)
}

/// A TCP socket's state and how much it was ever given to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendProgress {
    /// `tcpi_state` (TCP_ESTABLISHED = 1, TCP_CLOSE = 7, …).
    pub state: u8,
    /// Every byte ever handed to the socket for sending: acknowledged plus still queued.
    pub queued_total: u64,
    /// Bytes queued and not yet acknowledged by the peer (SIOCOUTQ).
    pub unacked: u64,
    /// Bytes received in order (`tcpi_bytes_received`; a FIN counts as one).
    pub received_total: u64,
}

pub fn send_progress(fd: BorrowedFd<'_>) -> io::Result<SendProgress> {
    let info = tcp_info(fd)?;
    let unacked = outq(fd)?;
    Ok(SendProgress {
        state: info.state,
        queued_total: info.bytes_acked + unacked,
        unacked,
        received_total: info.bytes_received,
    })
}

/// Sets SO_SNDBUF beyond `net.core.wmem_max` when allowed (SO_SNDBUFFORCE needs
/// CAP_NET_ADMIN, which kernel forwarding has anyway), else within it.
pub fn force_send_buffer(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes))
}

/// The socket's receive buffer (SO_RCVBUF: what the kernel uses, twice what was asked for).
pub fn receive_buffer(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt::<u32>(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)
}

/// Sets SO_RCVBUF past `net.core.rmem_max` where lb may (SO_RCVBUFFORCE), else within it.
pub fn force_receive_buffer(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes))
}

/// Non-blocking `recv`; `Ok(0)` is end of stream.
pub fn recv_nowait(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv(fd, buf, libc::MSG_DONTWAIT)
}

/// Non-blocking `recv` with MSG_PEEK: copies waiting bytes without consuming them; `Ok(0)` is
/// end of stream.
pub fn peek_nowait(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv(fd, buf, libc::MSG_DONTWAIT | libc::MSG_PEEK)
}

fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    unsafe { recv_raw(fd, buf.as_mut_ptr(), buf.len(), flags) }
}

/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn recv_raw(fd: BorrowedFd<'_>, ptr: *mut u8, len: usize, flags: i32) -> io::Result<usize> {
    // SAFETY: the caller's promise.
    let n = unsafe { libc::recv(fd.as_raw_fd(), ptr.cast(), len, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Memory a socket's receive side holds and may hold (SO_MEMINFO): `(rmem_alloc, rcvbuf)`,
/// in bytes of buffer space (payload plus overhead).
pub fn receive_memory(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SK_MEMINFO_RMEM_ALLOC = 0, SK_MEMINFO_RCVBUF = 1 (include/uapi/linux/sock_diag.h).
    let info = getsockopt::<[u32; 9]>(fd, libc::SOL_SOCKET, libc::SO_MEMINFO)?;
    Ok((info[0], info[1]))
}

/// Runs the bytes a socket received before it entered the SOCKHASH through the verdict
/// program, without reading any: setting SO_RCVLOWAT calls the socket's data-ready callback
/// (tcp_set_rcvlowat → tcp_data_ready), which the psock replaced with its verdict reader.
/// A `recv` would instead read such bytes straight from the TCP queue, past the program's
/// accounting. 1 is the default low-water mark, so nothing else changes.
pub fn kick(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Whether the socket reports a hang-up now (both directions shut, or closed), without
/// waiting.
pub fn hung_up(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(poll_now(fd, 0)? & libc::POLLHUP != 0)
}

/// Whether a non-blocking connect has completed, without waiting: `Ok(true)` connected,
/// `Ok(false)` still in progress, `Err` the connect failed (SO_ERROR).
pub fn connect_done(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let revents = poll_now(fd, libc::POLLOUT)?;
    if revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        // A failed connect leaves its error in SO_ERROR; a hang-up without one is a reset.
        let err = getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
        return Err(match err {
            0 => io::ErrorKind::ConnectionReset.into(),
            e => io::Error::from_raw_os_error(e),
        });
    }
    // TCP reports POLLOUT only once the handshake is over (never in SYN_SENT).
    Ok(revents & libc::POLLOUT != 0)
}

/// The socket's poll events now (`events` plus the errors and hang-ups poll always reports).
fn poll_now(fd: BorrowedFd<'_>, events: i16) -> io::Result<i16> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; timeout 0 never blocks.
    if unsafe { libc::poll(&mut pfd, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents)
}

/// Non-blocking `recv` into `buf`'s spare capacity (its length grows by what was read);
/// `Ok(0)` is end of stream (or no spare capacity).
pub fn recv_buf_nowait(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: spare is valid for writes of spare.len() bytes.
    let n = unsafe { recv_raw(fd, spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT)? };
    // SAFETY: the kernel initialised the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Non-blocking `send` (no SIGPIPE).
pub fn send_nowait(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    send(fd, buf, 0)
}

/// Non-blocking `send` with MSG_MORE: the bytes wait in the send queue (even with
/// TCP_NODELAY) for what follows, so a `shutdown` right after sends them with the FIN in one
/// segment. The caller must follow up at once: nothing else pushes them out.
pub fn send_more_nowait(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    send(fd, buf, libc::MSG_MORE)
}

fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The destination the client originally connected to, before an iptables REDIRECT/DNAT
/// (SO_ORIGINAL_DST). `None` when the connection was not redirected.
pub fn original_dst(fd: BorrowedFd<'_>, local: SocketAddr) -> Option<SocketAddr> {
    const SO_ORIGINAL_DST: i32 = 80; // linux/netfilter_ipv4.h, same value for IP6T_SO_ORIGINAL_DST
    match local {
        SocketAddr::V4(_) => {
            let sa: libc::sockaddr_in = getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST).ok()?;
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
        }
        SocketAddr::V6(_) => {
            let sa: libc::sockaddr_in6 = getsockopt(fd, libc::SOL_IPV6, SO_ORIGINAL_DST).ok()?;
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sa.sin6_port),
                0,
                0,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Write, net::TcpListener, os::fd::AsFd};

    #[test]
    fn counters_of_a_real_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let before = send_progress(c.as_fd()).unwrap().queued_total;
        c.write_all(&[7u8; 1000]).unwrap();
        assert_eq!(send_progress(c.as_fd()).unwrap().queued_total - before, 1000);
        assert_ne!(cookie(c.as_fd()).unwrap(), cookie(s.as_fd()).unwrap());
        let mut buf = [0u8; 2000];
        // One loopback segment: once peek sees it, all 1000 bytes are queued.
        s.peek(&mut buf).unwrap();
        let got = recv_nowait(s.as_fd(), &mut buf).unwrap();
        assert_eq!(got, 1000);
        assert_eq!(original_dst(s.as_fd(), s.local_addr().unwrap()), None);
    }
}
