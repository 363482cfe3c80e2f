//! One direction of a kernel flow (bytes from `from` to its peer): the daemon's side of the
//! hand-off protocol (../../LIFECYCLE.md).
//!
//! While the program redirects, the direction sleeps. When the program holds bytes (the brake,
//! or bytes that arrived before the peer was in the map) it wakes the direction, which:
//! 1. waits until the kernel's queue towards the peer is empty (so the held bytes cannot
//!    overtake redirected ones) and the bound leaves room: the peer's unacknowledged bytes are
//!    at least [`STEP`] below `max_in_flight`;
//! 2. takes as many held bytes as that room allows off the socket, writes them to the peer and
//!    publishes the count (`consumed`); a socket whose receive memory overflowed its buffer has
//!    its held bytes taken at once, before there is room (see [`overcommitted`]);
//! 3. once `consumed == passed`, goes back to sleep: the program resumes redirecting on the
//!    next segment (if the peer is below the bound), or signals again.
//!
//! Why take the held bytes as soon as there is room, rather than let the sender stop and copy
//! them in one go: a read from a socket's psock queue sends no window update on this kernel
//! (6.18). Once the sender has used its whole window it stays silent, with a window smaller
//! than a segment, until its probe timer fires about 200 ms later, whatever the daemon read.
//! Reading while the sender still has segments in flight reopens the window through the ACKs
//! of those segments. Measured with iperf3, one stream, 16 MiB bound, alternating runs on one
//! machine: 14.9–16.5 Gbit/s against 8.8–11.2 when the daemon waited for the receiver to drain
//! to half the bound and the sender to stop first.
//!
//! End of stream is passed on the same way: after every byte, the peer's write side is shut.
use std::{io, os::fd::AsFd, sync::atomic::Ordering::Relaxed, time::Duration};
use tokio::time::Instant;

use super::{Flow, Halt, TCP_CLOSE};
use crate::{
    bpf::Interest,
    forward::{End, Side},
    sockopt,
};

/// Most bytes read at once. The buffer exists only while a direction's bytes are held; it
/// grows past this only to take an overcommitted socket's bytes (up to `max_in_flight`).
const MAX_COPY: usize = 4 << 20;
/// Most bytes of a dropped side ([`super::Directions::ServerToClient`]) read at once.
const DROP_STEP: usize = 16 << 10;
/// Reads per wake-up before yielding to other tasks (a fast sender cannot hold the thread).
const ROUNDS: usize = 64;
/// Polls of a peer's progress that only yield to other tasks before the poller sleeps.
const SPIN_ROUNDS: u32 = 256;
/// The least room under the bound worth a copy.
const STEP: u64 = 256 << 10;
/// How often, at most, the daemon polls a peer's progress while it waits for room.
const MAX_POLL: Duration = Duration::from_millis(20);

/// What one round of copying found.
enum Pumped {
    /// Nothing more to do until the program or the socket signals.
    Idle,
    /// Out of rounds with bytes still to copy.
    More,
    /// The source's end of stream, after every byte.
    EndOfStream,
}

/// Forwards one direction until its end of stream has been passed on (`Ok`), or the flow
/// stops.
pub(super) async fn run(flow: &Flow<'_, '_>, from: Side) -> Result<(), Halt> {
    let src = flow.end(from);
    let mut copy = Copier::default();
    loop {
        // Boxed: copying is rare (brakes, end of stream) and its state is large; an idle
        // direction, the common case for many flows, keeps only the wait below.
        match Box::pin(pump(flow, from, &mut copy)).await? {
            Pumped::EndOfStream => break,
            Pumped::More => tokio::task::yield_now().await,
            Pumped::Idle => src.watch.wait().await?,
        }
    }
    src.watch.set_interest(Interest::ErrorsOnly);
    if flow.drops(from) {
        // Nothing of it went on, nor does its end (see Directions::ServerToClient).
        return Ok(());
    }
    Box::pin(wait_until_delivered(flow, from, None)).await?;
    if let Err(e) = flow.end(from.other()).sock.shutdown(std::net::Shutdown::Write) {
        tracing::debug!("shutdown of the {} side failed: {e}", from.other().name());
        return Err(Halt::Ended(End::Reset(from.other())));
    }
    Ok(())
}

/// After `side`'s end of stream was passed on, its socket reports only errors and hang-ups:
/// a reset (the flow ends), or a hang-up after both shutdowns (nothing more to learn). A
/// wake-up can also be the program's or a stale one: the socket itself tells which.
pub(super) async fn after_end_of_stream(flow: &Flow<'_, '_>, side: Side) -> Halt {
    let end = flow.end(side);
    loop {
        if let Err(e) = end.watch.wait().await {
            return Halt::Failed(e);
        }
        let state = sockopt::send_progress(end.sock.as_fd()).map(|p| p.state);
        match (state, end.sock.take_error()) {
            (Err(e), _) | (_, Err(e)) => return Halt::Failed(e),
            (Ok(TCP_CLOSE), _) | (_, Ok(Some(_))) => return Halt::Ended(End::Reset(side)),
            _ => match sockopt::hung_up(end.sock.as_fd()) {
                Err(e) => return Halt::Failed(e),
                Ok(true) => {
                    end.watch.forget();
                    std::future::pending::<()>().await;
                }
                Ok(false) => {}
            },
        }
    }
}

/// The direction's copying state: held bytes read off the source and not yet written to the
/// peer (`buf[start..end]`; the buffer exists only while bytes are held, and is reused between
/// reads), and whether the source is watched for input.
#[derive(Default)]
struct Copier {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    watching_input: bool,
}

impl Copier {
    fn pending(&self) -> u64 {
        (self.end - self.start) as u64
    }
}

/// Copies what the program held, up to [`ROUNDS`] reads.
async fn pump(flow: &Flow<'_, '_>, from: Side, copy: &mut Copier) -> Result<Pumped, Halt> {
    let src = flow.end(from);
    let ctl = src.tracked.ctl();
    for _ in 0..ROUNDS {
        let (passed, consumed) = (ctl.passed(), ctl.consumed());
        if passed == consumed {
            // Caught up: the program redirects the next segment (or signals again).
            if copy.watching_input {
                src.watch.set_interest(Interest::EndOfStream);
                copy.watching_input = false;
            }
            *copy = Copier::default();
            flow.note_braked(from, false);
            // Only an end of stream or an error can be waiting (or a segment passed since).
            return match sockopt::peek_nowait(src.sock.as_fd(), &mut [0u8; 1]) {
                Ok(0) => Ok(Pumped::EndOfStream),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Pumped::Idle),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(failed(from, e)),
            };
        }
        // Braked: the kernel had redirected this direction's bytes and stopped. (Bytes held
        // since the flow entered the map, say from a sender that flooded between the two
        // inserts, count as braked once the receiver has no room for them: see
        // `wait_until_delivered`.)
        if ctl.redirected() > 0 {
            flow.note_braked(from, true);
        }
        let max = u64::from(ctl.max_in_flight());
        if copy.pending() < max && overcommitted(src.sock.as_fd()).map_err(|e| failed(from, e))? {
            // Take the excess off the socket now, whatever the peer's room: see `overcommitted`.
            match take_held(flow, from, copy, max - copy.pending()) {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(failed(from, e)),
            }
        }
        let lag = wait_until_delivered(flow, from, Some(max.saturating_sub(STEP))).await?;
        let room = max.saturating_sub(lag);
        if copy.pending() == 0 {
            match take_held(flow, from, copy, room) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Counted by the program, not queued yet: the socket reports it.
                    if !copy.watching_input {
                        src.watch.set_interest(Interest::Input);
                        copy.watching_input = true;
                    }
                    return Ok(Pumped::Idle);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(failed(from, e)),
            }
        }
        forward_pending(flow, from, copy, room).await?;
    }
    Ok(Pumped::More)
}

/// Whether the source's receive memory is above its buffer size. Held bytes normally fill it
/// only up to the window TCP advertised; but bytes the program passes can wait, uncharged, in
/// the psock's own backlog (when the kernel could not queue them at once) and be charged all
/// at once later: seen at 9.9 MB on a 2 MB buffer under CPU contention. TCP then drops every
/// segment in the window it had offered, and once the window is zero it also rejects the
/// sender's pure ACKs whose sequence number lies past it, so this socket's own sends stall
/// (retransmission timeouts doubling to minutes: a flow stuck for the whole idle timeout).
/// Taking those bytes into the daemon's buffer ends that; they were accepted already, so lb
/// holds no more than before.
fn overcommitted(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    let (allocated, size) = sockopt::receive_memory(fd)?;
    Ok(allocated > size)
}

/// Reads up to `limit` held bytes of `from` (at most [`MAX_COPY`] at once) behind the
/// pending ones. The read asks for no more than the program counted, so no byte that bypassed
/// it can be forwarded; it runs the program over segments not seen yet first
/// (tcp_bpf_recvmsg_parser), so it returns counted bytes only, in order.
fn take_held(flow: &Flow<'_, '_>, from: Side, copy: &mut Copier, limit: u64) -> io::Result<()> {
    let src = flow.end(from);
    let ctl = src.tracked.ctl();
    let held = ctl.passed() - ctl.consumed() - copy.pending();
    // Bytes to be dropped are read in small steps: a flooding client costs no large buffer.
    let most = if flow.drops(from) { DROP_STEP } else { MAX_COPY };
    let want = held.min(limit).min(most as u64) as usize;
    if want == 0 {
        return Ok(());
    }
    if copy.start == copy.end {
        (copy.start, copy.end) = (0, 0);
    } else if copy.start > 0 {
        copy.buf.copy_within(copy.start..copy.end, 0);
        (copy.start, copy.end) = (0, copy.end - copy.start);
    }
    if copy.buf.len() < copy.end + want {
        copy.buf.resize(copy.end + want, 0);
    }
    let end = copy.end;
    match sockopt::recv_nowait(src.sock.as_fd(), &mut copy.buf[end..end + want])? {
        // The sender's FIN is in, and the held bytes before it are still on their way to the
        // socket's queue (the psock's backlog worker moves them): as if not counted yet.
        0 => Err(io::ErrorKind::WouldBlock.into()),
        n => {
            copy.end += n;
            Ok(())
        }
    }
}

/// Writes pending held bytes of `from` to its peer, at most `room` (what the bound leaves),
/// then publishes them as consumed: until then the program keeps holding newer segments
/// behind them. A dropped side's bytes are only counted as consumed.
async fn forward_pending(flow: &Flow<'_, '_>, from: Side, copy: &mut Copier, room: u64) -> Result<(), Halt> {
    // The wait before left at least STEP of room; never write nothing.
    let n = copy.pending().min(room.max(1)) as usize;
    if flow.drops(from) {
        flow.discarded.fetch_add(n as u64, Relaxed);
    } else {
        write_all(flow, from.other(), &copy.buf[copy.start..copy.start + n]).await?;
        flow.counters.user_bytes.add(n as u64);
    }
    copy.start += n;
    let ctl = flow.end(from).tracked.ctl();
    // Only now, with the bytes in the peer's send queue, may the program resume.
    ctl.set_consumed(ctl.consumed() + n as u64);
    Ok(())
}

fn failed(side: Side, e: io::Error) -> Halt {
    tracing::debug!("{} side failed: {e}", side.name());
    Halt::Ended(End::Reset(side))
}

/// Waits until the peer of `from` has queued every byte given to it from `from` (redirected by
/// the kernel or written by the daemon), and, with `lag`, until no more than `lag` of them are
/// unacknowledged; returns how many are then. Waiting for the receiver to make room under
/// `lag` (not merely for the kernel to queue redirected bytes) marks the direction braked.
/// Ends the flow if the peer closed (reset) meanwhile or made no progress for its idle timeout.
async fn wait_until_delivered(flow: &Flow<'_, '_>, from: Side, lag: Option<u64>) -> Result<u64, Halt> {
    let dst = flow.end(from.other());
    let limit = flow.timeouts.of(from.other());
    let mut delay = Duration::from_micros(50);
    let mut last = (u64::MAX, u64::MAX);
    let mut last_progress = Instant::now();
    let mut noted = false;
    for round in 0u32.. {
        let given = flow.given_to_peer(from);
        let s = dst.send_state()?;
        if s.state == TCP_CLOSE {
            return Err(Halt::Ended(End::Reset(from.other())));
        }
        let unacked = given.saturating_sub(s.acked);
        let room = lag.is_none_or(|lag| unacked <= lag);
        if s.queued >= given && room {
            return Ok(unacked);
        }
        if !room && !noted {
            flow.note_braked(from, true);
            noted = true;
        }
        if (s.queued, s.acked) != last {
            last = (s.queued, s.acked);
            last_progress = Instant::now();
            delay = Duration::from_micros(50);
        } else if last_progress.elapsed() >= limit {
            return Err(Halt::Ended(End::IdleTimeout(from.other())));
        }
        // The kernel worker usually catches up within microseconds, and a braked sender waits
        // for this: yield to other tasks for a while before sleeping (a tokio sleep lasts at
        // least a millisecond).
        if round < SPIN_ROUNDS {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_POLL);
        }
    }
    unreachable!("the loop above only ends by returning")
}

/// Writes bytes to side `to` outside tokio's reactor, polling while its send buffer is full.
/// Ends the flow if the socket failed, or stayed full for `to`'s idle timeout.
async fn write_all(flow: &Flow<'_, '_>, to: Side, mut bytes: &[u8]) -> Result<(), Halt> {
    let dst = flow.end(to);
    let limit = flow.timeouts.of(to);
    let mut delay = Duration::from_micros(50);
    let mut last_progress = Instant::now();
    while !bytes.is_empty() {
        match sockopt::send_nowait(dst.sock.as_fd(), bytes) {
            Ok(n) => {
                bytes = &bytes[n..];
                last_progress = Instant::now();
                delay = Duration::from_micros(50);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if last_progress.elapsed() >= limit {
                    return Err(Halt::Ended(End::IdleTimeout(to)));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_POLL);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(to, e)),
        }
    }
    Ok(())
}
