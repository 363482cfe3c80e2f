//! Kernel forwarding of one established flow through the BPF SOCKHASH.
//!
//! Set-up: track both cookies, record each socket's send baseline, insert both sockets (each
//! under its peer's cookie), then "kick" each with a non-blocking recv so bytes that were queued
//! before insertion run through the verdict program. After that the daemon sleeps on a private
//! epoll set that reports only hang-ups and errors, so redirected data never wakes it, plus one
//! timer for the idle timeouts.
//!
//! The kernel does not pass FIN on, and it sends redirected bytes from a worker after the
//! verdict: on end of stream from one side, the daemon waits until the peer's TCP send counters
//! show every redirected byte queued, and only then shuts the peer's write side.
//!
//! Bytes that miss the map (a segment that arrived between the two inserts) are passed to the
//! receiving socket's own queue, and from then on the program passes every byte of that socket
//! ("sticky"), so the daemon copies that direction itself, in order.
use prometheus_client::metrics::counter::Counter;
use std::{
    io,
    net::TcpStream,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};
use tokio::time::Instant;

use super::{epoll::Epoll, End, Side, Timeouts};
use crate::{bpf::Kernel, sockopt};

/// TCP states from include/net/tcp_states.h (libc does not export them).
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;

/// How often, at most, the delivery check polls while waiting for the kernel to catch up.
const MAX_DELIVERY_POLL: Duration = Duration::from_millis(20);
/// Userspace copy buffer, allocated only for a direction that is copied.
const COPY_BUF: usize = 64 * 1024;

/// One socket of a kernel-forwarded flow.
struct FlowSocket {
    sock: TcpStream,
    cookie: u64,
    /// Bytes the socket had been given to send before the flow entered the map (an active
    /// opener's SYN counts as one).
    baseline: u64,
    /// Bytes the daemon itself wrote to this socket (copied from its peer).
    user_written: u64,
    /// Its end of stream was seen and passed on (the peer's write side is shut).
    eof: bool,
    /// Its bytes missed the map once, so the program passes them all to its own queue and
    /// the daemon copies them.
    copied: bool,
}

impl FlowSocket {
    /// Returns the socket and whether it is ESTABLISHED (the only state the SOCKHASH takes).
    fn new(sock: TcpStream) -> io::Result<(FlowSocket, bool)> {
        let fd = sock.as_fd();
        let cookie = sockopt::cookie(fd)?;
        let progress = sockopt::send_progress(fd)?;
        let socket = FlowSocket {
            sock,
            cookie,
            baseline: progress.queued_total,
            user_written: 0,
            eof: false,
            copied: false,
        };
        Ok((socket, progress.state == TCP_ESTABLISHED))
    }

    /// Bytes handed to this socket for sending since the flow entered the map, and its state.
    fn sent(&self) -> io::Result<(u64, u8)> {
        let p = sockopt::send_progress(self.sock.as_fd())?;
        Ok((p.queued_total.saturating_sub(self.baseline), p.state))
    }
}

/// A flow while it is in the SOCKHASH. Dropping it removes both entries and closes the
/// sockets, with a reset unless [`Flow::close`] found the streams complete: an aborted flow
/// (lb stopping) or one with undelivered bytes must not look like a clean end to either peer.
struct Flow<'k> {
    kernel: &'k Kernel,
    ends: [FlowSocket; 2],
    reset_on_drop: bool,
}

impl Drop for Flow<'_> {
    fn drop(&mut self) {
        for end in &self.ends {
            self.kernel.forget(end.cookie);
        }
        self.kernel.flow_ended();
        if self.reset_on_drop {
            for end in &self.ends {
                let _ = socket2::SockRef::from(&end.sock).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

impl Flow<'_> {
    fn end(&self, side: Side) -> &FlowSocket {
        &self.ends[side.index()]
    }

    /// Ends the flow: a plain close only when nothing is left in flight either way.
    fn close(mut self, end: End) -> Forwarded {
        self.reset_on_drop = match end {
            End::Closed => false,
            End::IdleTimeout(_) => !self.nothing_in_flight(),
            End::Reset(_) => true,
        };
        Forwarded::Done(end)
    }

    /// Every byte from each side is queued on the other and acknowledged by its peer.
    fn nothing_in_flight(&self) -> bool {
        [Side::Client, Side::Server].into_iter().all(|from| {
            let dst = self.end(from.other());
            let target = self.kernel.counters(self.end(from).cookie).redirected_bytes + dst.user_written;
            let progress = sockopt::send_progress(dst.sock.as_fd());
            matches!(progress, Ok(p) if p.queued_total.saturating_sub(dst.baseline) >= target && p.unacked == 0)
        })
    }
}

/// What became of a flow handed to the kernel path.
pub enum Forwarded {
    /// Forwarded until it ended.
    Done(End),
    /// The kernel would not take the pair (a socket was no longer ESTABLISHED, e.g. a client
    /// that sent its request and half-closed at once, or the map was full): the caller
    /// forwards it in userspace.
    NotEligible(tokio::net::TcpStream, tokio::net::TcpStream),
}

/// Forwards the flow in the kernel until it ends. Only failures of socket calls are errors;
/// how the flow ended is the [`End`]. Bytes the daemon copies itself are added to `user_bytes`.
pub async fn forward(
    kernel: &Kernel,
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    timeouts: Timeouts,
    sndbuf: Option<u32>,
    user_bytes: &Counter,
) -> io::Result<Forwarded> {
    // Out of tokio's reactor: tokio's registration would wake us for every received batch.
    let (c, c_established) = FlowSocket::new(client.into_std()?)?;
    let (s, s_established) = FlowSocket::new(server.into_std()?)?;
    let established = c_established && s_established;
    if let (true, Some(bytes)) = (established, sndbuf) {
        // The kernel's forwarding worker pauses for a tick whenever the destination's send
        // buffer is full: a large fixed buffer keeps it from stalling (tune.kernel_sndbuf).
        for end in [&c, &s] {
            sockopt::force_send_buffer(end.sock.as_fd(), bytes)?;
        }
    }
    if !(established && insert_pair(kernel, &c, &s)) {
        return Ok(Forwarded::NotEligible(
            tokio::net::TcpStream::from_std(c.sock)?,
            tokio::net::TcpStream::from_std(s.sock)?,
        ));
    }
    kernel.flow_started();
    let mut flow = Flow {
        kernel,
        ends: [c, s],
        reset_on_drop: true,
    };
    let epoll = Epoll::new([&flow.ends[0].sock, &flow.ends[1].sock])?;
    // The kick: a recv on each socket runs bytes queued before insertion through the program.
    for side in [Side::Client, Side::Server] {
        if let Some(end) = on_readable(&mut flow, side, &epoll, timeouts, user_bytes).await? {
            return Ok(flow.close(end));
        }
    }
    // Activity only pushes a side's deadline later, so the daemon looks at TCP_INFO only when
    // the earliest possible expiry comes, not after every event.
    let mut wake = Instant::now() + timeouts.client.min(timeouts.server);
    loop {
        if flow.ends.iter().all(|e| e.eof) {
            return Ok(flow.close(End::Closed));
        }
        if Instant::now() >= wake {
            wake = match idle_check(&flow, timeouts)? {
                Ok(deadline) => deadline,
                Err(side) => return Ok(flow.close(End::IdleTimeout(side))),
            };
        }
        tokio::select! {
            ready = epoll.wait() => {
                for side in ready? {
                    if let Some(end) = on_readable(&mut flow, side, &epoll, timeouts, user_bytes).await? {
                        return Ok(flow.close(end));
                    }
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Tracks both sockets and inserts each under its peer's cookie. Returns false when the kernel
/// refused; the flow is then forwarded in userspace. If only the first insert succeeded, the
/// server socket stays in the map until it closes: every byte it receives misses the absent
/// client entry and is passed to its own queue, where userspace reads it, so removing it (which
/// would purge that queue) is not needed.
fn insert_pair(kernel: &Kernel, c: &FlowSocket, s: &FlowSocket) -> bool {
    let untrack = || {
        kernel.untrack(c.cookie);
        kernel.untrack(s.cookie);
    };
    if let Err(e) = kernel.track(c.cookie).and_then(|()| kernel.track(s.cookie)) {
        tracing::debug!("flow stays in userspace: counters map: {e}");
        untrack();
        return false;
    }
    // The server's entry goes in first: it attaches the server socket, which in client-first
    // protocols is the one not expected to send in the instant between the two inserts.
    if let Err(e) = kernel.insert(c.cookie, s.sock.as_raw_fd()) {
        tracing::debug!("flow stays in userspace: SOCKHASH insert failed: {e}");
        untrack();
        return false;
    }
    if let Some(gap) = insert_gap_for_tests() {
        std::thread::sleep(gap);
    }
    if let Err(e) = kernel.insert(s.cookie, c.sock.as_raw_fd()) {
        tracing::debug!("flow stays in userspace: second SOCKHASH insert failed: {e}");
        untrack();
        return false;
    }
    true
}

/// Fault injection for the end-to-end tests: `LB_TEST_INSERT_GAP_MS` widens the instant between
/// the two inserts, so bytes that miss the map (and the sticky userspace copy that keeps them in
/// order) can be tested deterministically. Unset in normal use.
fn insert_gap_for_tests() -> Option<Duration> {
    static GAP: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *GAP.get_or_init(|| {
        let ms: u64 = std::env::var("LB_TEST_INSERT_GAP_MS").ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    })
}

/// Handles what a socket reports: end of stream, a reset, or bytes to copy (they missed the
/// map). Returns how the flow ended, if it did.
async fn on_readable(
    flow: &mut Flow<'_>,
    side: Side,
    epoll: &Epoll,
    timeouts: Timeouts,
    user_bytes: &Counter,
) -> io::Result<Option<End>> {
    if flow.end(side).eof {
        // Past its end of stream a socket reports only errors and hang-ups: a reset.
        let (_, state) = flow.end(side).sent()?;
        let error = flow.end(side).sock.take_error()?;
        if state == TCP_CLOSE || error.is_some() {
            return Ok(Some(End::Reset(side)));
        }
        // A hang-up after both shutdowns: nothing more to learn from this socket.
        epoll.forget(&flow.end(side).sock);
        return Ok(None);
    }
    // Normally nothing is readable (the kernel redirected it all), so the first recv uses a
    // one-byte buffer and a real one is allocated only for a direction that is copied: every
    // flow's future carries this function's locals, and 10k idle flows must stay small.
    let mut probe = [0u8; 1];
    let mut buf: Vec<u8> = Vec::new();
    let mut len = 0;
    // Bounded: a fast sender cannot hold the task forever; level-triggered epoll calls again.
    for _ in 0..64 {
        let space: &mut [u8] = if buf.is_empty() {
            &mut probe
        } else {
            &mut buf[len..]
        };
        let got = match sockopt::recv_nowait(flow.end(side).sock.as_fd(), space) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                tracing::debug!("{} side failed: {e}", side.name());
                return Ok(Some(End::Reset(side)));
            }
            Ok(n) => Some(n),
        };
        if got.is_some_and(|n| n > 0) && buf.is_empty() {
            // The first copied byte: switch this direction to userspace copying.
            buf = vec![0u8; COPY_BUF];
            buf[0] = probe[0];
            len = 1;
            if !flow.end(side).copied {
                flow.ends[side.index()].copied = true;
                epoll.with_input(&flow.end(side).sock, side)?;
            }
            continue;
        }
        len += got.unwrap_or(0);
        // Write what was gathered when the socket is drained, at end of stream, or when full.
        if len > 0 && (got.is_none() || got == Some(0) || len == buf.len()) {
            if let Some(end) = copy(flow, side, &buf[..len], timeouts, user_bytes).await? {
                return Ok(Some(end));
            }
            len = 0;
        }
        match got {
            None => return Ok(None),
            Some(0) => return on_end_of_stream(flow, side, epoll, timeouts).await,
            Some(_) => {}
        }
    }
    // Out of rounds: hand on what was gathered; level-triggered epoll reports the rest.
    if len > 0 {
        return copy(flow, side, &buf[..len], timeouts, user_bytes).await;
    }
    Ok(None)
}

/// Writes bytes read from `from` to its peer, after every byte the kernel redirected that way
/// before (the stream stays in order).
async fn copy(
    flow: &mut Flow<'_>,
    from: Side,
    bytes: &[u8],
    timeouts: Timeouts,
    user_bytes: &Counter,
) -> io::Result<Option<End>> {
    if let Some(end) = deliver_all(flow, from, timeouts).await? {
        return Ok(Some(end));
    }
    let dst = &mut flow.ends[from.other().index()];
    if !write_all(dst, bytes, timeouts.of(from.other())).await? {
        return Ok(Some(End::Reset(from.other())));
    }
    user_bytes.inc_by(bytes.len() as u64);
    Ok(None)
}

/// Passes `side`'s end of stream on: once its peer has queued every byte from it, shut the
/// peer's write side.
async fn on_end_of_stream(
    flow: &mut Flow<'_>,
    side: Side,
    epoll: &Epoll,
    timeouts: Timeouts,
) -> io::Result<Option<End>> {
    epoll.errors_only(&flow.end(side).sock, side)?;
    if let Some(end) = deliver_all(flow, side, timeouts).await? {
        return Ok(Some(end));
    }
    if let Err(e) = flow.end(side.other()).sock.shutdown(std::net::Shutdown::Write) {
        tracing::debug!("shutdown of the {} side failed: {e}", side.other().name());
        return Ok(Some(End::Reset(side.other())));
    }
    flow.ends[side.index()].eof = true;
    Ok(None)
}

/// Waits until the peer of `from` has queued every byte that came from `from`: redirected by
/// the kernel or written by us. Ends the flow if the peer closed (reset) meanwhile or made no
/// progress for its idle timeout.
async fn deliver_all(flow: &Flow<'_>, from: Side, timeouts: Timeouts) -> io::Result<Option<End>> {
    let src = flow.end(from);
    let dst = flow.end(from.other());
    let limit = timeouts.of(from.other());
    let mut delay = Duration::from_micros(50);
    let mut last = u64::MAX;
    let mut last_progress = Instant::now();
    for round in 0u32.. {
        let target = flow.kernel.counters(src.cookie).redirected_bytes + dst.user_written;
        let (sent, state) = dst.sent()?;
        if state == TCP_CLOSE {
            return Ok(Some(End::Reset(from.other())));
        }
        if sent >= target {
            return Ok(None);
        }
        if sent != last {
            last = sent;
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= limit {
            return Ok(Some(End::IdleTimeout(from.other())));
        }
        // The kernel worker usually catches up within microseconds: yield to other tasks a
        // few times before sleeping (a tokio sleep lasts at least a millisecond).
        if round < 8 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_DELIVERY_POLL);
        }
    }
    unreachable!("the loop above only ends by returning")
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
        let info = sockopt::tcp_info(flow.end(side).sock.as_fd())?;
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
