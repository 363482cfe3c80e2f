//! Userspace forwarding of one established flow: a copy loop per direction, used when kernel
//! forwarding is unavailable or turned off, for a flow the kernel would not take, and for the
//! first `forwarding.offload_after` bytes of every flow (short flows never pay the kernel
//! path's set-up). Same contract as the kernel path: half-closes are passed on, resets are
//! passed on, idle sides time out, and a flow that does not end cleanly is closed with a reset.
//!
//! The hand-off to the kernel: once a direction has moved `offload_after` bytes, both copy
//! loops stop between a read and the next (nothing is left half-written), then each socket is
//! read until it is empty and what was read is written on, so no segment is left partly read
//! (the kernel would forward a partly read segment again, whole). The caller then hands the
//! pair to the kernel path, which takes every byte that arrives from then on.
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
use tokio_util::sync::CancellationToken;

use super::{ByteCounters, Directions, End, Side, Timeouts, Totals};

/// First buffer per direction; it grows to [`MAX_BUF`] when reads fill it (bulk flows).
const FIRST_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 64 * 1024;

/// Reads before a hand-off gives up on emptying a socket (a sender that never pauses): the
/// flow then goes on in userspace and tries again after another `offload_after` bytes.
const DRAIN_ROUNDS: usize = 64;

/// How a userspace flow ended.
pub enum UserEnd {
    /// Forwarded until it ended (what this call forwarded: the kernel's count is 0).
    Ended(End, Totals),
    /// A direction moved `offload_after` bytes and both sockets are emptied: the caller hands
    /// the pair to the kernel.
    Offload(TcpStream, TcpStream),
    /// The hand-off was attempted but a socket kept sending: the caller goes on in userspace
    /// and tries again later.
    Continue(TcpStream, TcpStream),
    /// A side had ended its stream: the kernel cannot take the pair (only ESTABLISHED sockets
    /// can), so the caller forwards it in userspace to the end.
    StayInUser(TcpStream, TcpStream),
}

/// Forwards until both directions are closed, one side resets, or one side idles out; with
/// `offload_after`, until a direction has moved that many bytes and the pair can be handed to
/// the kernel. With [`Directions::ServerToClient`] the client's bytes are read and dropped.
pub async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    timeouts: Timeouts,
    bytes: ByteCounters<'_>,
    offload_after: Option<u64>,
    directions: Directions,
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
            now: CancellationToken::new(),
        },
        dropped: directions.dropped(),
    };
    let (clock, writing) = (&shared.clock, &shared.writing);
    let stopped = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let c2s = pump(&mut cr, &mut sw, Side::Client, &shared);
        let s2c = pump(&mut sr, &mut cw, Side::Server, &shared);
        tokio::pin!(c2s, s2c);
        // Per direction: None while it runs, then how it stopped.
        let (mut c2s_done, mut s2c_done) = (None, None);
        loop {
            match (c2s_done, s2c_done) {
                (Some(Pumped::EndOfStream), Some(Pumped::EndOfStream)) => break Err(End::Closed),
                // Both stopped for the hand-off (or one had ended its stream meanwhile).
                (Some(c), Some(s)) => break Ok(c == Pumped::Paused && s == Pumped::Paused),
                _ => {}
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
        Ok(false) => {
            guard.armed = false;
            drop(guard);
            return UserEnd::StayInUser(client, server);
        }
        Ok(true) => match drain_both(&mut client, &mut server, timeouts, &shared).await {
            Ok(drained) => {
                guard.armed = false;
                drop(guard);
                return match drained {
                    true => UserEnd::Offload(client, server),
                    false => UserEnd::Continue(client, server),
                };
            }
            Err(end) => end,
        },
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
    UserEnd::Ended(end, Totals { kernel: 0, to_client })
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
}

/// The hand-off trigger shared by both directions.
struct Offload {
    /// Bytes one direction moves before the flow is handed to the kernel.
    after: u64,
    /// Cancelled when a direction reached `after`: both copy loops stop.
    now: CancellationToken,
}

/// How a copy loop stopped (other than failing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pumped {
    /// End of stream, passed on.
    EndOfStream,
    /// Stopped between two reads for the hand-off.
    Paused,
}

/// Empties both sockets for the hand-off. `Ok(true)`: both are empty; `Ok(false)`: one kept
/// sending or ended its stream meanwhile (the flow goes on in userspace); `Err`: how the flow
/// ended.
async fn drain_both(
    client: &mut TcpStream,
    server: &mut TcpStream,
    timeouts: Timeouts,
    shared: &Shared<'_>,
) -> Result<bool, End> {
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    Ok(drain(&mut cr, &mut sw, Side::Client, timeouts, shared).await?
        && drain(&mut sr, &mut cw, Side::Server, timeouts, shared).await?)
}

/// Reads a socket until it is empty (or [`DRAIN_ROUNDS`] reads), writing what it reads on
/// (within the destination's idle timeout) unless the direction drops it. `Ok(true)`: it was
/// emptied; `Ok(false)`: it kept sending or ended its stream.
async fn drain(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    from: Side,
    timeouts: Timeouts,
    shared: &Shared<'_>,
) -> Result<bool, End> {
    let drop = shared.dropped == Some(from);
    let mut buf = vec![0u8; MAX_BUF];
    for _ in 0..DRAIN_ROUNDS {
        // A real recv each time: tokio's try_read answers WouldBlock from its cached readiness
        // without asking the kernel, and "empty" must be the kernel's word (a segment left
        // partly read would be forwarded again, whole, once the socket is in the map).
        match crate::sockopt::recv_nowait(src.as_ref().as_fd(), &mut buf) {
            Ok(0) => return Ok(false),
            Ok(_) if drop => {}
            Ok(n) => {
                // A write cut short would lose bytes: a stuck destination ends the flow.
                match tokio::time::timeout(timeouts.of(from.other()), dst.write_all(&buf[..n])).await {
                    Ok(Ok(())) => {
                        shared.bytes.add(n as u64);
                        shared.sent[from.index()].fetch_add(n as u64, Relaxed);
                    }
                    Ok(Err(_)) => return Err(End::Reset(from.other())),
                    Err(_) => return Err(End::IdleTimeout(from.other())),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(End::Reset(from)),
        }
    }
    Ok(false)
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
/// for the hand-off, until a direction moved `offload.after` bytes (stopping between reads).
/// `Err(side)` names the side that failed.
async fn pump(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    from: Side,
    shared: &Shared<'_>,
) -> Result<Pumped, Side> {
    let Shared {
        clock,
        writing,
        ended,
        sent,
        bytes,
        offload,
        dropped,
    } = shared;
    // No buffer while the source is quiet (the design notes' buffers allocated only when
    // needed): one is taken when the source has something to read, kept while reads fill it
    // (a bulk flow), and given back after a short read, so an idle flow holds none. Reads fill
    // its spare capacity (read_buf): it is never zero-filled, which on short flows was the
    // largest cost lb itself added.
    let mut buf: Vec<u8> = Vec::new();
    let mut moved = 0u64;
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
                _ = offload.now.cancelled() => return Ok(Pumped::Paused),
                r = src.as_ref().readable() => r.map_err(|_| from)?,
            }
            buf.reserve_exact(FIRST_BUF);
        }
        // A read is cancel-safe: stopping here for the hand-off loses nothing.
        let n = match buf.len() {
            0 => tokio::select! {
                biased;
                _ = offload.now.cancelled() => return Ok(Pumped::Paused),
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
            // syscall to every short connection. A dropped side's end is not passed on
            // (see Directions::ServerToClient).
            if !ended[from.other().index()].load(Relaxed) && *dropped != Some(from) {
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
        let full = n == buf.capacity();
        let ends = !full && end_follows(src, &mut buf).map_err(|_| from)?;
        writing[from.index()].store(true, Relaxed);
        if ends {
            write_last(dst, &buf).await.map_err(|_| from.other())?;
        } else {
            write_eager(dst, &buf).await.map_err(|_| from.other())?;
        }
        writing[from.index()].store(false, Relaxed);
        clock.touch(from.other());
        bytes.add(buf.len() as u64);
        sent[from.index()].fetch_add(buf.len() as u64, Relaxed);
        if ends {
            ended[from.index()].store(true, Relaxed);
            return Ok(Pumped::EndOfStream);
        }
        moved += buf.len() as u64;
        if !full {
            buf = Vec::new();
        } else {
            buf.clear();
            if buf.capacity() < MAX_BUF {
                buf.reserve_exact(MAX_BUF);
            }
        }
        if moved >= offload.after {
            offload.now.cancel();
            return Ok(Pumped::Paused);
        }
    }
}

/// Writes all of `data`, trying the socket before asking tokio whether it is writable: a
/// server socket fresh from the connect stage has not had its first readiness event yet, and
/// waiting for it would put a turn of the event loop on every connection's critical path.
async fn write_eager(dst: &mut WriteHalf<'_>, data: &[u8]) -> std::io::Result<()> {
    let sent = taken(crate::sockopt::send_nowait(dst.as_ref().as_fd(), data))?;
    dst.write_all(&data[sent..]).await
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
/// MSG_MORE did not take goes out by a plain write.
async fn write_last(dst: &mut WriteHalf<'_>, data: &[u8]) -> std::io::Result<()> {
    // Tried at once, like write_eager.
    let queued = taken(crate::sockopt::send_more_nowait(dst.as_ref().as_fd(), data))?;
    dst.write_all(&data[queued..]).await?;
    dst.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::loopback_pair;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn server_to_client_only_drops_the_clients_bytes_and_its_end() {
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
        let flow = forward(client, server, timeouts, bytes, None, Directions::ServerToClient);
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
            server_peer.write_all(b"rest of the body").await.unwrap();
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
        assert_eq!(totals.to_client, 16);
        assert_eq!((total.get(), per_server.get()), (16, 16));
    }
}
