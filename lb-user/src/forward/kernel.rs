//! Kernel forwarding of one established flow through the BPF SOCKHASH.
//!
//! Set-up: track both cookies, record each socket's send baseline, insert both sockets (each
//! under its peer's cookie), then "kick" each with a non-blocking recv so bytes that were queued
//! before insertion run through the verdict program. After that the daemon sleeps on a private
//! epoll set that reports only hang-ups and errors (EPOLLRDHUP), so redirected data never wakes
//! it, plus one timer for the idle timeouts.
//!
//! The kernel does not pass FIN on, and it sends redirected bytes from a worker after the
//! verdict: on end of stream from one side, the daemon waits until the peer's TCP send counters
//! show every redirected byte queued, and only then shuts the peer's write side.
use std::{
    io,
    net::TcpStream,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};
use tokio::{io::unix::AsyncFd, time::Instant};

use super::{End, Side, Timeouts, UserBytes};
use crate::{bpf::Kernel, sockopt};

/// TCP states from include/net/tcp_states.h (libc does not export them).
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;

/// How often, at most, the delivery check polls while waiting for the kernel to catch up.
const MAX_DELIVERY_POLL: Duration = Duration::from_millis(20);

/// One socket of a kernel-forwarded flow.
struct FlowSocket {
    sock: TcpStream,
    cookie: u64,
    /// `queued_total` before the flow entered the map: what the socket sent before (an active
    /// opener's SYN counts as one byte).
    baseline: u64,
    /// Bytes the daemon itself wrote to this socket (skbs that missed the map).
    user_written: u64,
    /// End of stream seen and passed on (our write side of the peer is shut).
    eof: bool,
    /// In TCP_ESTABLISHED when the flow was set up (the only state the SOCKHASH accepts).
    established: bool,
}

/// A flow while it is in the SOCKHASH. Dropping it removes both entries and closes the sockets;
/// a flow that did not end cleanly is closed with a reset so neither peer mistakes a cut stream
/// for a complete one.
struct Flow<'k> {
    kernel: &'k Kernel,
    ends: [FlowSocket; 2],
    clean: bool,
}

impl Drop for Flow<'_> {
    fn drop(&mut self) {
        for end in &self.ends {
            self.kernel.forget(end.cookie);
        }
        if !self.clean {
            for end in &self.ends {
                let _ = socket2::SockRef::from(&end.sock).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Server => 1,
    }
}

/// What became of a flow handed to the kernel path.
pub enum Forwarded {
    /// Forwarded until it ended.
    Done(End, UserBytes),
    /// The kernel would not take the pair (a socket was no longer ESTABLISHED, e.g. a client
    /// that sent its request and half-closed at once, or the map was full): nothing was
    /// forwarded, the caller forwards it in userspace.
    NotEligible(tokio::net::TcpStream, tokio::net::TcpStream),
}

/// Forwards the flow in the kernel until it ends. Only failures to set the flow up are errors;
/// how an established flow ended is the [`End`].
pub async fn forward(
    kernel: &Kernel,
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    timeouts: Timeouts,
    sndbuf: Option<u32>,
) -> io::Result<Forwarded> {
    // Out of tokio's reactor: tokio's registration would wake us for every received batch.
    let c = FlowSocket::new(client.into_std()?)?;
    let s = FlowSocket::new(server.into_std()?)?;
    // The kernel only takes ESTABLISHED sockets; a socket that already received a FIN stays in
    // userspace for the rest of its (short) life.
    let established = c.established && s.established;
    if let (true, Some(bytes)) = (established, sndbuf) {
        // The kernel's forwarding worker pauses for a tick whenever the destination's send
        // buffer is full: a large fixed buffer keeps it from stalling (tune.kernel_sndbuf).
        for end in [&c, &s] {
            sockopt::force_send_buffer(end.sock.as_fd(), bytes)?;
        }
    }
    let eligible = established && insert_pair(kernel, &c, &s);
    if !eligible {
        return Ok(Forwarded::NotEligible(
            tokio::net::TcpStream::from_std(c.sock)?,
            tokio::net::TcpStream::from_std(s.sock)?,
        ));
    }
    let mut flow = Flow {
        kernel,
        ends: [c, s],
        clean: false,
    };
    let epoll = Epoll::new(&flow)?;
    let mut user = UserBytes::default();
    // The kick: a recv on each socket runs bytes queued before insertion through the program.
    for side in [Side::Client, Side::Server] {
        if let Some(end) = on_readable(&mut flow, side, &epoll, timeouts, &mut user).await? {
            return Ok(finish(flow, end, user));
        }
    }
    loop {
        if flow.ends.iter().all(|e| e.eof) {
            flow.clean = true;
            return Ok(Forwarded::Done(End::Closed, user));
        }
        let wake = match idle_check(&flow, timeouts)? {
            Ok(deadline) => deadline,
            Err(side) => return Ok(finish(flow, End::IdleTimeout(side), user)),
        };
        tokio::select! {
            ready = epoll.wait() => {
                for side in ready? {
                    if let Some(end) = on_readable(&mut flow, side, &epoll, timeouts, &mut user).await? {
                        return Ok(finish(flow, end, user));
                    }
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

fn finish(mut flow: Flow<'_>, end: End, user: UserBytes) -> Forwarded {
    if let End::IdleTimeout(_) = end {
        // Nothing is in flight on an idle flow: a plain close is enough.
        flow.clean = true;
    }
    Forwarded::Done(end, user)
}

/// Tracks both sockets and inserts each under its peer's cookie. On failure nothing is left in
/// the maps.
fn insert_pair(kernel: &Kernel, c: &FlowSocket, s: &FlowSocket) -> bool {
    let inserted = kernel
        .track(c.cookie)
        .and_then(|()| kernel.track(s.cookie))
        // The server's entry goes in first: it attaches the server socket, which in
        // client-first protocols is the one not expected to send in the instant between the
        // two inserts.
        .and_then(|()| kernel.insert(c.cookie, s.sock.as_raw_fd()))
        .and_then(|()| kernel.insert(s.cookie, c.sock.as_raw_fd()));
    if let Err(e) = inserted {
        tracing::debug!("flow stays in userspace: SOCKHASH insert failed: {e}");
        kernel.forget(c.cookie);
        kernel.forget(s.cookie);
        return false;
    }
    true
}

impl FlowSocket {
    fn new(sock: TcpStream) -> io::Result<FlowSocket> {
        let fd = sock.as_fd();
        let cookie = sockopt::cookie(fd)?;
        let progress = sockopt::send_progress(fd)?;
        let baseline = progress.queued_total;
        let established = progress.state == TCP_ESTABLISHED;
        Ok(FlowSocket {
            sock,
            cookie,
            baseline,
            user_written: 0,
            eof: false,
            established,
        })
    }
}

/// Handles what a socket reports: end of stream, a reset, or bytes that missed the map.
/// Returns how the flow ended, if it did.
async fn on_readable(
    flow: &mut Flow<'_>,
    side: Side,
    epoll: &Epoll,
    timeouts: Timeouts,
    user: &mut UserBytes,
) -> io::Result<Option<End>> {
    // Normally nothing is readable (the kernel redirected it all), so probe with one byte and
    // allocate a real buffer only when bytes did miss the map: every flow's future carries
    // this function's locals, and 10k idle flows must stay small.
    let mut probe = [0u8; 1];
    let mut heap: Option<Vec<u8>> = None;
    // Bounded: a sender whose bytes keep missing the map cannot hold the task forever.
    for _ in 0..64 {
        if flow.ends[idx(side)].eof {
            return Ok(None);
        }
        let buf: &mut [u8] = match heap.as_mut() {
            Some(b) => b,
            None => &mut probe,
        };
        match sockopt::recv_nowait(flow.ends[idx(side)].sock.as_fd(), buf) {
            Ok(0) => {
                epoll.forget(&flow.ends[idx(side)].sock);
                if let Some(end) = deliver_all(flow, side, timeouts).await? {
                    return Ok(Some(end));
                }
                let peer = &flow.ends[idx(side.other())];
                if let Err(e) = peer.sock.shutdown(std::net::Shutdown::Write) {
                    tracing::debug!("shutdown of the {} side failed: {e}", side.other().name());
                    return Ok(Some(End::Reset(side.other())));
                }
                flow.ends[idx(side)].eof = true;
                return Ok(None);
            }
            Ok(n) => {
                // No peer in the map when these arrived: forward them ourselves, after every
                // byte the kernel already redirected, so the stream stays in order.
                if let Some(end) = deliver_all(flow, side, timeouts).await? {
                    return Ok(Some(end));
                }
                let bytes = heap.as_deref().unwrap_or(&probe);
                let dst = &mut flow.ends[idx(side.other())];
                if !write_all(dst, &bytes[..n], timeouts.of(side.other())).await? {
                    return Ok(Some(End::Reset(side.other())));
                }
                user.0 += n as u64;
                heap.get_or_insert_with(|| vec![0u8; 64 * 1024]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!("{} side failed: {e}", side.name());
                return Ok(Some(End::Reset(side)));
            }
        }
    }
    Ok(None)
}

/// Waits until the peer of `from` has queued every byte that came from `from`: redirected by
/// the kernel or written by us. Ends the flow if the peer closed (reset) meanwhile or made no
/// progress for its idle timeout.
async fn deliver_all(flow: &Flow<'_>, from: Side, timeouts: Timeouts) -> io::Result<Option<End>> {
    let src = &flow.ends[idx(from)];
    let dst = &flow.ends[idx(from.other())];
    let limit = timeouts.of(from.other());
    let mut delay = Duration::from_micros(50);
    let mut last = u64::MAX;
    let mut last_progress = Instant::now();
    loop {
        let target = flow.kernel.counters(src.cookie).redirected_bytes + dst.user_written;
        let progress = sockopt::send_progress(dst.sock.as_fd())?;
        if progress.state == TCP_CLOSE {
            return Ok(Some(End::Reset(from.other())));
        }
        let queued = progress.queued_total.saturating_sub(dst.baseline);
        if queued >= target {
            return Ok(None);
        }
        if queued != last {
            last = queued;
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= limit {
            return Ok(Some(End::IdleTimeout(from.other())));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELIVERY_POLL);
    }
}

/// Writes bytes to a socket outside tokio's reactor, polling while its send buffer is full.
/// Returns false if the socket failed or stayed full for `limit`.
async fn write_all(dst: &mut FlowSocket, mut bytes: &[u8], limit: Duration) -> io::Result<bool> {
    let mut delay = Duration::from_micros(50);
    let mut last_progress = Instant::now();
    while !bytes.is_empty() {
        match sockopt::send_nowait(dst.sock.as_fd(), bytes) {
            Ok(n) => {
                bytes = &bytes[n..];
                dst.user_written += n as u64;
                last_progress = Instant::now();
                delay = Duration::from_micros(50);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if last_progress.elapsed() >= limit {
                    return Ok(false);
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_DELIVERY_POLL);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(true)
}

/// Idle detection from TCP_INFO: a side is idle while its socket neither received nor sent new
/// data (`tcpi_last_data_recv`, `tcpi_last_data_sent`); the kernel keeps those clocks, so the
/// daemon only looks when a timeout could have expired.
/// `Ok(when to look again)` or `Err(side that timed out)`.
fn idle_check(flow: &Flow<'_>, timeouts: Timeouts) -> io::Result<Result<Instant, Side>> {
    let now = Instant::now();
    let mut wake = now + timeouts.client.max(timeouts.server);
    for side in [Side::Client, Side::Server] {
        let info = sockopt::tcp_info(flow.ends[idx(side)].sock.as_fd())?;
        let idle = Duration::from_millis(info.last_data_recv.min(info.last_data_sent) as u64);
        let limit = timeouts.of(side);
        if idle >= limit {
            return Ok(Err(side));
        }
        wake = wake.min(now + (limit - idle));
    }
    // Millisecond clocks: look a little after the earliest possible expiry.
    Ok(Ok(wake + Duration::from_millis(2)))
}

/// A private epoll set holding the flow's two sockets with EPOLLRDHUP only (errors and
/// hang-ups are always reported), registered with tokio as one readable fd.
struct Epoll {
    fd: AsyncFd<OwnedFd>,
}

impl Epoll {
    fn new(flow: &Flow<'_>) -> io::Result<Epoll> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        for (i, end) in flow.ends.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLRDHUP as u32,
                u64: i as u64,
            };
            // SAFETY: both fds are valid; ev is a valid event.
            if unsafe { libc::epoll_ctl(raw, libc::EPOLL_CTL_ADD, end.sock.as_raw_fd(), &mut ev) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Epoll { fd })
    }

    /// Stops watching a socket (after its end of stream, which would otherwise stay ready).
    fn forget(&self, sock: &TcpStream) {
        // SAFETY: valid fds; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                sock.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }

    /// Waits until a socket reports a hang-up or an error; returns which.
    async fn wait(&self) -> io::Result<Vec<Side>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // SAFETY: events has room for 2 entries; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), 2, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            return Ok(events[..n as usize]
                .iter()
                .map(|e| if e.u64 == 0 { Side::Client } else { Side::Server })
                .collect());
        }
    }
}
