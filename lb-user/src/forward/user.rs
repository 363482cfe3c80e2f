//! Userspace forwarding of one established flow: a copy loop per direction, used when kernel
//! forwarding is unavailable or turned off, for a flow the kernel would not take, and for the
//! first `forwarding.offload_after` bytes of every flow (short flows never pay the kernel
//! path's set-up). Same contract as the kernel path: half-closes are passed on, resets are
//! passed on, idle sides time out, and a flow that does not end cleanly is closed with a reset.
//!
//! The hand-off to the kernel: once a direction has moved `offload_after` bytes, both copy
//! loops stop at once, each on its own: one waiting to read stops before reading, one in the
//! middle of a write stops with what it has not written yet ([`Unsent`]). Neither waits for the
//! other, nor for a socket to be empty: a sender that never pauses, or a serial server that
//! does not read while it writes, cannot keep the flow from the kernel or stall it. The kernel
//! path writes the unsent bytes of a direction first and only then lets the program redirect
//! that direction; bytes still queued on a socket go through the program, which skips what lb
//! had already read of a segment.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
    time::Instant,
};

use super::{ByteCounters, Directions, End, Side, Timeouts, Totals, Unsent};

/// First buffer per direction; it grows to [`MAX_BUF`] when reads fill it (bulk flows).
const FIRST_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 64 * 1024;

/// How a userspace flow ended.
pub enum UserEnd {
    /// Forwarded until it ended (what this call forwarded: the kernel's count is 0).
    Ended(End, Totals),
    /// A direction moved `offload_after` bytes and both copy loops stopped: the caller hands
    /// the pair to the kernel, with the bytes the loops had not written yet.
    Offload(TcpStream, TcpStream, Unsent),
    /// A side had ended its stream: the kernel cannot take the pair (only ESTABLISHED sockets
    /// can), so the caller forwards it in userspace to the end, the unsent bytes first.
    StayInUser(TcpStream, TcpStream, Unsent),
}

/// Forwards until both directions are closed, one side resets, or one side idles out; with
/// `offload_after`, until a direction has moved that many bytes and the pair can be handed to
/// the kernel. With [`Directions::ServerToClient`] the client's bytes are read and dropped.
/// `unsent`: bytes an earlier copy loop read and did not write, written first.
pub async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    timeouts: Timeouts,
    bytes: ByteCounters<'_>,
    offload_after: Option<u64>,
    directions: Directions,
    mut unsent: Unsent,
) -> UserEnd {
    // Declared before the halves borrow the streams, dropped after them: if this future is
    // dropped (lb's grace period ran out) the guard is still armed and both peers get a reset.
    let mut guard = ResetOnDrop {
        fds: [client.as_raw_fd(), server.as_raw_fd()],
        armed: true,
    };
    let start = Instant::now();
    let clock = Clock {
        start,
        last: [AtomicU64::new(0), AtomicU64::new(0)],
    };
    let shared = Shared {
        clock,
        writing: [AtomicBool::new(false), AtomicBool::new(false)],
        ended: [AtomicBool::new(false), AtomicBool::new(false)],
        sent: [AtomicU64::new(0), AtomicU64::new(0)],
        bytes,
        offload: Offload {
            after: offload_after.unwrap_or(u64::MAX),
            due: AtomicBool::new(false),
        },
        dropped: directions.dropped(),
        limits: [Side::Client, Side::Server].map(|s| directions.limit(s)),
        past_limit: AtomicU64::new(0),
    };
    let (clock, writing) = (&shared.clock, &shared.writing);
    let stopped = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let c2s = pump(&mut cr, &mut sw, Side::Client, &shared, unsent.take(Side::Client));
        let s2c = pump(&mut sr, &mut cw, Side::Server, &shared, unsent.take(Side::Server));
        tokio::pin!(c2s, s2c);
        // Per direction: None while it runs, then how it stopped.
        let (mut c2s_done, mut s2c_done) = (None, None);
        loop {
            match (c2s_done.take(), s2c_done.take()) {
                (Some(Pumped::EndOfStream), Some(Pumped::EndOfStream)) => break Err(End::Closed),
                // Both stopped for the hand-off (or one had ended its stream meanwhile).
                (Some(c), Some(s)) => break Ok([c, s]),
                (c, s) => (c2s_done, s2c_done) = (c, s),
            }
            let deadline = [Side::Client, Side::Server]
                .iter()
                .map(|&s| clock.last(s) + timeouts.of(s))
                .min()
                .unwrap_or(start);
            tokio::select! {
                r = &mut c2s, if c2s_done.is_none() => match r {
                    Ok(p) => c2s_done = Some(p),
                    Err(side) => break Err(End::Reset(side)),
                },
                r = &mut s2c, if s2c_done.is_none() => match r {
                    Ok(p) => s2c_done = Some(p),
                    Err(side) => break Err(End::Reset(side)),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    if let Some(side) = [Side::Client, Side::Server]
                        .into_iter()
                        .find(|&s| now.duration_since(clock.last(s)) >= timeouts.of(s))
                    {
                        break Err(End::IdleTimeout(side));
                    }
                }
            }
        }
    };
    let end = match stopped {
        Ok(stopped) => {
            guard.armed = false;
            drop(guard);
            let mut left = Unsent::default();
            let mut both_paused = true;
            for (side, pumped) in [Side::Client, Side::Server].into_iter().zip(stopped) {
                match pumped {
                    Pumped::Paused(bytes) => left.set(side, bytes),
                    Pumped::EndOfStream => both_paused = false,
                }
            }
            return match both_paused {
                true => UserEnd::Offload(client, server, left),
                false => UserEnd::StayInUser(client, server, left),
            };
        }
        Err(end) => end,
    };
    // A plain close only when the streams are complete: after both ends of stream, or on an
    // idle flow with no write pending.
    guard.armed = match end {
        End::Closed => false,
        End::IdleTimeout(_) => writing.iter().any(|w| w.load(Relaxed)),
        End::Reset(_) => true,
    };
    let to_client = shared.sent[Side::Server.index()].load(Relaxed);
    UserEnd::Ended(
        end,
        Totals {
            kernel: 0,
            to_client,
            past_limit: shared.past_limit.load(Relaxed),
        },
    )
}

/// What the two copy loops of a flow share.
struct Shared<'a> {
    clock: Clock,
    /// Per side: a write of the bytes read from that side is under way.
    writing: [AtomicBool; 2],
    /// Per side: its end of stream was read and passed on.
    ended: [AtomicBool; 2],
    /// Per side: bytes read from it and written to the other (this flow's share of `bytes`).
    sent: [AtomicU64; 2],
    bytes: ByteCounters<'a>,
    offload: Offload,
    /// The side whose bytes are read and dropped ([`Directions::dropped`]).
    dropped: Option<Side>,
    /// Per side: the most bytes its direction forwards ([`Directions::limit`]).
    limits: [Option<u64>; 2],
    /// Bytes read past a limit, dropped.
    past_limit: AtomicU64,
}

/// The hand-off trigger shared by both directions.
///
/// A flag, not a cancellation token: both copy loops are polled by the flow's one task (the
/// `select!` in [`forward`] polls both whenever it is woken), so a flag they look at each time
/// they are polled reaches the other loop at its next poll, which the setter makes happen at
/// once. A token's waits lock a mutex each time they are made or polled: on short flows, a
/// measurable share of lb's own CPU time.
struct Offload {
    /// Bytes one direction moves before the flow is handed to the kernel.
    after: u64,
    /// Set when a direction reached `after`: both copy loops stop.
    due: AtomicBool,
}

impl Offload {
    /// Resolves once the hand-off is due (registers no waker: see above).
    fn wait(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|_| match self.due.load(Relaxed) {
            true => std::task::Poll::Ready(()),
            false => std::task::Poll::Pending,
        })
    }

    /// Makes the hand-off due, and the task poll both loops again.
    async fn trigger(&self) {
        self.due.store(true, Relaxed);
        std::future::poll_fn(|cx| {
            cx.waker().wake_by_ref();
            std::task::Poll::Ready(())
        })
        .await
    }
}

/// How a copy loop stopped (other than failing).
#[derive(Debug, PartialEq, Eq)]
enum Pumped {
    /// End of stream, passed on.
    EndOfStream,
    /// Stopped for the hand-off, with the bytes it had read and not yet written.
    Paused(Vec<u8>),
}

/// Sets SO_LINGER 0 on both sockets when dropped armed, so closing them sends a reset.
pub(super) struct ResetOnDrop {
    pub(super) fds: [RawFd; 2],
    pub(super) armed: bool,
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if self.armed {
            for fd in self.fds {
                // SAFETY: the streams that own these fds are dropped after the guard.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

/// When each side last moved a byte, as nanoseconds since the flow started (atomics, so the
/// two direction futures can update it while the flow's future stays `Send`).
pub(super) struct Clock {
    pub(super) start: Instant,
    pub(super) last: [AtomicU64; 2],
}

impl Clock {
    pub(super) fn touch(&self, side: Side) {
        self.last[side.index()].store(self.start.elapsed().as_nanos() as u64, Relaxed);
    }
    pub(super) fn last(&self, side: Side) -> Instant {
        self.start + Duration::from_nanos(self.last[side.index()].load(Relaxed))
    }
}

/// Copies one direction until end of stream, then shuts the destination's write side; or,
/// for the hand-off, until a direction moved `offload.after` bytes (then it stops at once,
/// mid-write if need be). `unsent`: bytes of this direction an earlier loop had not written,
/// written first. `Err(side)` names the side that failed.
async fn pump(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    from: Side,
    shared: &Shared<'_>,
    unsent: Vec<u8>,
) -> Result<Pumped, Side> {
    let Shared {
        clock,
        writing,
        ended,
        offload,
        dropped,
        ..
    } = shared;
    let mut moved = 0u64;
    // What the direction may still forward (the rest of a body of known length).
    let mut budget = shared.limits[from.index()];
    if !unsent.is_empty() {
        let mut unsent = unsent;
        within(&mut budget, &mut unsent, shared);
        if !deliver(dst, &mut unsent, from, shared, &mut moved).await? {
            return Ok(Pumped::Paused(unsent));
        }
    }
    // No buffer while the source is quiet (the design notes' buffers allocated only when
    // needed): one is taken when the source has something to read, kept while reads fill it
    // (a bulk flow), and given back after a short read, so an idle flow holds none. Reads fill
    // its spare capacity (read_buf): it is never zero-filled, which on short flows was the
    // largest cost lb itself added.
    let mut buf: Vec<u8> = Vec::new();
    // The client usually speaks first, and its first bytes are often there by the time the
    // server is connected: they are read at once, as HAProxy does after an accept, rather than
    // after the event loop has reported the new socket readable.
    if from == Side::Client {
        buf.reserve_exact(FIRST_BUF);
        match crate::sockopt::recv_buf_nowait(src.as_ref().as_fd(), &mut buf) {
            Ok(_) => {}
            Err(e) if is_retry(&e) => buf = Vec::new(),
            Err(_) => return Err(from),
        }
    }
    loop {
        if buf.capacity() == 0 {
            // Readiness waits are cancel-safe too.
            tokio::select! {
                biased;
                () = offload.wait() => return Ok(Pumped::Paused(Vec::new())),
                r = src.as_ref().readable() => r.map_err(|_| from)?,
            }
            buf.reserve_exact(FIRST_BUF);
        }
        // A read is cancel-safe: stopping here for the hand-off loses nothing.
        let n = match buf.len() {
            0 => tokio::select! {
                biased;
                () = offload.wait() => return Ok(Pumped::Paused(Vec::new())),
                r = src.read_buf(&mut buf) => r.map_err(|_| from)?,
            },
            // The first read, before the loop, found bytes.
            n => n,
        };
        clock.touch(from);
        if n == 0 {
            // When the other direction has ended too, the flow is over and its sockets are
            // closed as soon as this returns: that close sends the FIN (every byte received
            // was read, so it is not a reset), and a shutdown call first would only add a
            // syscall to every short connection. The same when the other side's end of
            // stream is already here, unread (a client and a server closing together): the
            // other direction reads it next and the flow is over then. A dropped side's end
            // is not passed on (see Directions::ServerToClient).
            if !ended[from.other().index()].load(Relaxed)
                && *dropped != Some(from)
                && !read_closed(dst.as_ref())
            {
                dst.shutdown().await.map_err(|_| from.other())?;
            }
            ended[from.index()].store(true, Relaxed);
            return Ok(Pumped::EndOfStream);
        }
        if *dropped == Some(from) {
            // Bytes past what the HTTP analyzers let through: never forwarded.
            buf = Vec::new();
            continue;
        }
        if !within(&mut budget, &mut buf, shared) {
            // All of it past the limit: dropped, and so is what follows, to the end.
            buf = Vec::new();
            continue;
        }
        let full = n == buf.capacity();
        // (Not with a budget: what the look-ahead read would bring is not checked against it.)
        if !full && budget.is_none() && end_follows(src, &mut buf).map_err(|_| from)? {
            writing[from.index()].store(true, Relaxed);
            let written = write_last(dst, &buf, offload).await.map_err(|_| from.other())?;
            writing[from.index()].store(false, Relaxed);
            count(shared, from, written);
            if written < buf.len() {
                // The hand-off came first (say a serial server not reading while it writes):
                // the next path writes the rest and finds the end of stream again.
                buf.drain(..written);
                return Ok(Pumped::Paused(buf));
            }
            ended[from.index()].store(true, Relaxed);
            return Ok(Pumped::EndOfStream);
        }
        if !deliver(dst, &mut buf, from, shared, &mut moved).await? {
            // The hand-off came first: what is left goes with it.
            return Ok(Pumped::Paused(buf));
        }
        if budget == Some(0) {
            // The body is whole: its end goes on now. A server that keeps its connection
            // open, or sends past the body, holds the flow no longer.
            dst.shutdown().await.map_err(|_| from.other())?;
            ended[from.index()].store(true, Relaxed);
            return Ok(Pumped::EndOfStream);
        }
        // A full buffer is kept for the next read (a bulk flow), a short read's given back.
        if !full {
            buf = Vec::new();
        } else {
            buf.clear();
            if buf.capacity() < MAX_BUF {
                buf.reserve_exact(MAX_BUF);
            }
        }
        if moved >= offload.after {
            offload.trigger().await;
            return Ok(Pumped::Paused(Vec::new()));
        }
    }
}

/// Writes `data` to the destination; `false` if the hand-off came first, with what is left
/// unwritten in `data`. Adds what it wrote to `moved` and to the counters.
async fn deliver(
    dst: &mut WriteHalf<'_>,
    data: &mut Vec<u8>,
    from: Side,
    shared: &Shared<'_>,
    moved: &mut u64,
) -> Result<bool, Side> {
    shared.writing[from.index()].store(true, Relaxed);
    let written = write_until_handoff(dst, data, &shared.offload)
        .await
        .map_err(|_| from.other())?;
    shared.writing[from.index()].store(false, Relaxed);
    if written > 0 {
        shared.clock.touch(from.other());
        count(shared, from, written);
        *moved += written as u64;
    }
    if written == data.len() {
        return Ok(true);
    }
    data.drain(..written);
    Ok(false)
}

/// Keeps of `data` what `budget` still allows (the rest is dropped and counted) and takes it
/// off the budget; false when nothing is left of it.
fn within(budget: &mut Option<u64>, data: &mut Vec<u8>, shared: &Shared<'_>) -> bool {
    let Some(left) = budget else {
        return true;
    };
    if data.len() as u64 > *left {
        shared.past_limit.fetch_add(data.len() as u64 - *left, Relaxed);
        data.truncate(*left as usize);
    }
    *left -= data.len() as u64;
    !data.is_empty()
}

/// Counts `n` bytes from `from` as written to its peer.
fn count(shared: &Shared<'_>, from: Side, n: usize) {
    shared.bytes.add(n as u64);
    shared.sent[from.index()].fetch_add(n as u64, Relaxed);
}

/// Writes `data`, trying the socket before asking tokio whether it is writable (a server
/// socket fresh from the connect stage has not had its first readiness event yet, and waiting
/// for it would put a turn of the event loop on every connection's critical path); stops when
/// `handoff` is cancelled. Returns how much was written.
async fn write_until_handoff(
    dst: &mut WriteHalf<'_>,
    data: &[u8],
    handoff: &Offload,
) -> std::io::Result<usize> {
    let mut sent = taken(crate::sockopt::send_nowait(dst.as_ref().as_fd(), data))?;
    while sent < data.len() {
        // A write is cancel-safe: it either took bytes or did nothing.
        tokio::select! {
            biased;
            () = handoff.wait() => break,
            r = dst.write(&data[sent..]) => match r? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => sent += n,
            },
        }
    }
    Ok(sent)
}

/// What a non-blocking send took: nothing when the socket had no room now.
fn taken(sent: std::io::Result<usize>) -> std::io::Result<usize> {
    match sent {
        Err(e) if is_retry(&e) => Ok(0),
        sent => sent,
    }
}

/// A non-blocking socket call that found nothing to do now.
fn is_retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

/// Whether the peer of `socket` has ended its stream, as tokio was told (epoll's RDHUP): no
/// syscall, nothing read.
fn read_closed(socket: &tokio::net::TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let ready = std::pin::pin!(socket.ready(tokio::io::Interest::READABLE));
    matches!(std::future::Future::poll(ready, &mut cx), std::task::Poll::Ready(Ok(r)) if r.is_read_closed())
}

/// After a short read: whether the source's end of stream is already there, without waiting
/// and, usually, without a syscall. tokio keeps a socket's "read closed" readiness (epoll's
/// RDHUP) once seen, so `try_read` asks the kernel only when that, or new data, was reported;
/// new data is appended to `buf` (and `false` returned).
fn end_follows(src: &ReadHalf<'_>, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    match src.as_ref().try_read_buf(buf) {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        // The error is consumed by this read: a later one would see a clean end of stream.
        Err(e) => Err(e),
    }
}

/// Writes a direction's last bytes and its end of stream: queued with MSG_MORE, so that the
/// `shutdown` sends them with the FIN in one segment (one segment, and the peer's ACK of it,
/// fewer per short flow, like HAProxy when it reads data and close together). Whatever
/// MSG_MORE did not take goes out by a plain write, unless the hand-off comes first: then the
/// end of stream is not passed on, and what is returned (the bytes written) is short.
async fn write_last(dst: &mut WriteHalf<'_>, data: &[u8], handoff: &Offload) -> std::io::Result<usize> {
    // Tried at once, like write_until_handoff.
    let queued = taken(crate::sockopt::send_more_nowait(dst.as_ref().as_fd(), data))?;
    let mut written = queued;
    if queued < data.len() {
        written += write_until_handoff(dst, &data[queued..], handoff).await?;
    }
    if written == data.len() {
        dst.shutdown().await?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::loopback_pair;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn server_to_client_only_drops_the_clients_bytes_its_end_and_bytes_past_the_limit() {
        // (lb's socket, the peer's)
        let (client, mut client_peer) = loopback_pair().await;
        let (server, mut server_peer) = loopback_pair().await;
        let (total, per_server) = (Counter::default(), Counter::default());
        let bytes = ByteCounters {
            total: &total,
            server: &per_server,
        };
        let timeouts = Timeouts {
            client: Duration::from_secs(10),
            server: Duration::from_secs(10),
        };
        let flow = forward(
            client,
            server,
            timeouts,
            bytes,
            None,
            // The body's length: what the server sends past it never reaches the client.
            Directions::ServerToClient { limit: Some(16) },
            Unsent::default(),
        );
        let peers = async {
            // A pipelined request the server must never see, and the client's half-close,
            // which it must not see either (checked over a bounded wait: nothing else can show
            // an absence); then the rest of the response.
            client_peer
                .write_all(b"GET /smuggled HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            client_peer.shutdown().await.unwrap();
            let mut byte = [0u8; 1];
            let early = tokio::time::timeout(Duration::from_millis(200), server_peer.read(&mut byte)).await;
            assert!(
                early.is_err(),
                "the server saw {early:?} before the response was over"
            );
            server_peer
                .write_all(b"rest of the bodyHTTP/1.1 200 OK")
                .await
                .unwrap();
            server_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            client_peer.read_to_end(&mut got).await.unwrap();
            // The flow ends with the server's close, and lb closes the server side then.
            let mut seen = Vec::new();
            server_peer.read_to_end(&mut seen).await.unwrap();
            (got, seen)
        };
        let (end, (got, seen)) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(flow, peers) })
                .await
                .expect("the flow did not end");
        assert_eq!(got, b"rest of the body");
        assert!(
            seen.is_empty(),
            "the server got {:?}",
            String::from_utf8_lossy(&seen)
        );
        let UserEnd::Ended(end, totals) = end else {
            panic!("the flow did not end");
        };
        assert_eq!(end, End::Closed);
        assert_eq!((totals.to_client, totals.past_limit), (16, 15));
        assert_eq!((total.get(), per_server.get()), (16, 16));
    }

    #[tokio::test]
    async fn the_hand_off_stops_a_write_to_a_peer_that_does_not_read() {
        // A serial server: it writes its answer and reads nothing meanwhile. The client keeps
        // sending (and reads the answer), so lb's write to the server blocks once the small
        // buffers on the way are full; the answer then reaches offload_after, and the hand-off
        // must not wait for that write.
        let (client, client_peer) = loopback_pair().await;
        let (server, mut server_peer) = loopback_pair().await;
        socket2::SockRef::from(&server)
            .set_send_buffer_size(64 << 10)
            .unwrap();
        socket2::SockRef::from(&server_peer)
            .set_recv_buffer_size(64 << 10)
            .unwrap();
        let (total, per_server) = (Counter::default(), Counter::default());
        let bytes = ByteCounters {
            total: &total,
            server: &per_server,
        };
        let timeouts = Timeouts {
            client: Duration::from_secs(10),
            server: Duration::from_secs(10),
        };
        const UP: usize = 16 << 20;
        const ANSWER: usize = 4 << 20;
        let up: Vec<u8> = (0..UP).map(|i| (i % 251) as u8).collect();
        let (mut client_rx, mut client_tx) = client_peer.into_split();
        let sent = std::sync::Arc::new(AtomicU64::new(0));
        let sender = {
            let (up, sent) = (up.clone(), sent.clone());
            tokio::spawn(async move {
                // Ends when the test drops the flow's sockets.
                for chunk in up.chunks(64 << 10) {
                    if client_tx.write_all(chunk).await.is_err() {
                        return;
                    }
                    sent.fetch_add(chunk.len() as u64, Relaxed);
                }
            })
        };
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 << 10];
            while matches!(client_rx.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let answer = async {
            // Once the client has sent more than the server's way holds (its small buffers),
            // lb's copy loop is stuck in a write: only then does the answer start.
            for _ in 0..5000 {
                if sent.load(Relaxed) >= 1 << 20 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(sent.load(Relaxed) >= 1 << 20, "the client could not send");
            server_peer.write_all(&vec![7u8; ANSWER]).await.unwrap();
        };
        let flow = forward(
            client,
            server,
            timeouts,
            bytes,
            Some(2 << 20),
            Directions::Both,
            Unsent::default(),
        );
        let (end, ()) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(flow, answer) })
            .await
            .expect("the hand-off waited for a write the server would not take");
        let UserEnd::Offload(_client, mut server, unsent) = end else {
            panic!("the flow was not handed off");
        };
        let up_unsent = unsent.of(Side::Client).len();
        assert!(up_unsent > 0, "the write to the server was not stopped midway");
        // What reached the server, then what is left to send, is the start of the upload, in
        // order. (A half-close after what lb wrote marks its end.)
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        server_peer.read_to_end(&mut got).await.unwrap();
        let written_up = got.len();
        assert!(got == up[..written_up], "the server got the upload altered");
        assert!(
            unsent.of(Side::Client) == &up[written_up..written_up + up_unsent],
            "the unsent bytes are not the ones that follow"
        );
        sender.abort();
        reader.abort();
    }
}
