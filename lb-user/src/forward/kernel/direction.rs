//! One direction of a kernel flow (bytes from `from` to its peer): the daemon's side of the
//! hand-off protocol (../../LIFECYCLE.md).
//!
//! While the program redirects, the direction sleeps. When the program holds bytes (the brake,
//! or bytes that arrived before the peer was in the map) it wakes the direction, which:
//! 1. waits until the kernel's queue towards the peer is empty (so the held bytes cannot
//!    overtake redirected ones) and the peer's unacknowledged bytes are down to half the brake
//!    (hysteresis: resuming at the brake level would brake again at once);
//! 2. peeks the held bytes (at most as many as the program passed), writes them to the peer,
//!    publishes the count (`consumed`), then takes them out of the socket's queue;
//! 3. once `consumed == passed`, goes back to sleep: the program resumes redirecting on the
//!    next segment, or signals again.
//!
//! End of stream is passed on the same way: after every byte, the peer's write side is shut.
use std::{io, os::fd::AsFd, time::Duration};
use tokio::time::Instant;

use super::{Flow, Halt, TCP_CLOSE};
use crate::{
    bpf::Interest,
    forward::{End, Side},
    sockopt,
};

/// Most bytes copied at once: the whole held queue when the receive buffer is bounded
/// (`tune.kernel_rcvbuf`), so one copy hands the direction back. The buffer exists only while a
/// direction's bytes are held.
const MAX_COPY: usize = 4 << 20;
/// Reads per wake-up before yielding to other tasks (a fast sender cannot hold the thread).
const ROUNDS: usize = 64;
/// Polls of a peer's progress that only yield to other tasks before the poller sleeps.
const SPIN_ROUNDS: u32 = 256;
/// Room beyond what is held when peeking, for segments still arriving.
const PEEK_SLACK: usize = 256 << 10;
/// Peeks that forward segments which arrived inside the last window before the daemon gives up
/// handing the direction back this time (and tries again on the next round).
const CATCH_UP_PEEKS: usize = 8;
/// A sender that held nothing new for this long has stopped (or trickles): copy anyway.
const QUIET: Duration = Duration::from_millis(2);
/// The longest the daemon waits for a sender to stop before it copies anyway.
const QUIET_LIMIT: Duration = Duration::from_millis(20);
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

/// The direction's copying state: its buffer (only while bytes are held) and whether the
/// source is watched for input.
#[derive(Default)]
struct Copier {
    buf: Vec<u8>,
    watching_input: bool,
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
            copy.buf = Vec::new();
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
        if ctl.redirected() > 0 {
            flow.note_braked(from, true);
        }
        wait_until_delivered(flow, from, Some(u64::from(ctl.max_in_flight()) / 2)).await?;
        wait_until_quiet(flow, from).await?;
        match forward_held(flow, from, &mut copy.buf).await {
            Ok(0) => return Ok(Pumped::EndOfStream),
            Ok(_) => {}
            Err(Halt::Failed(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // Counted by the program, not queued yet: the socket reports it.
                if !copy.watching_input {
                    src.watch.set_interest(Interest::Input);
                    copy.watching_input = true;
                }
                return Ok(Pumped::Idle);
            }
            Err(Halt::Failed(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(Halt::Failed(e)) => return Err(failed(from, e)),
            Err(h) => return Err(h),
        }
    }
    Ok(Pumped::More)
}

/// Waits until `from`'s sender has stopped: its receive buffer is full, so TCP's window is
/// closed, or nothing new was held for [`QUIET`]; at most [`QUIET_LIMIT`] (a sender that
/// trickles forever is slower than the copy anyway). Copying the held bytes then hands the
/// direction back in one go (see [`forward_held`]); copying while the window is open chases a
/// fast sender for as long as it sends.
async fn wait_until_quiet(flow: &Flow<'_, '_>, from: Side) -> Result<(), Halt> {
    let src = flow.end(from);
    let ctl = src.tracked.ctl();
    let mut last = ctl.passed();
    let started = Instant::now();
    let mut since = started;
    loop {
        let (held, limit) = sockopt::receive_memory(src.sock.as_fd())?;
        // With an eighth free, the window the socket advertises is closed or a few segments.
        if u64::from(held) * 8 >= u64::from(limit) * 7
            || since.elapsed() >= QUIET
            || started.elapsed() >= QUIET_LIMIT
        {
            return Ok(());
        }
        tokio::task::yield_now().await;
        let now = ctl.passed();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// Forwards held bytes of `from`, returning how many (0: end of stream).
///
/// The bytes are peeked, written to the peer, published as consumed, and only then taken out
/// of the socket's queue. While they sit there the socket's receive buffer stays full and TCP's
/// window stays (nearly) closed. A few segments may still arrive inside the last window while
/// the daemon writes: it peeks again and forwards just those, until nothing arrived between
/// its last peek and the publication. Then the program sees `passed == consumed` on the very
/// next segment and resumes. Reading first would reopen the window, and a sender faster than
/// the copy would keep the direction in userspace.
async fn forward_held(flow: &Flow<'_, '_>, from: Side, buf: &mut Vec<u8>) -> Result<usize, Halt> {
    let src = flow.end(from);
    let ctl = src.tracked.ctl();
    let base = ctl.consumed();
    let mut forwarded = 0;
    for _ in 0..CATCH_UP_PEEKS {
        // Room for more than is held, so a full buffer never hides bytes that arrived since.
        let held = (ctl.passed() - base) as usize;
        if buf.len() <= held {
            buf.resize((held + PEEK_SLACK).min(MAX_COPY), 0);
        }
        let n = sockopt::peek_nowait(src.sock.as_fd(), buf)?;
        if n == 0 {
            return Ok(0);
        }
        // The program counts a byte before queueing it, so everything peeked is counted; more
        // would be bytes that bypassed it, which must never be forwarded out of order.
        if n as u64 > ctl.passed() - base {
            return Err(io::Error::other("the socket holds bytes the program did not pass").into());
        }
        if n > forwarded {
            write_all(flow, from.other(), &buf[forwarded..n]).await?;
            flow.counters.user_bytes.inc_by((n - forwarded) as u64);
            forwarded = n;
            // Only now, with the bytes in the peer's send queue, may the program resume.
            ctl.set_consumed(base + n as u64);
        }
        if ctl.passed() == base + n as u64 || n == MAX_COPY {
            break;
        }
    }
    // The forwarded bytes are at the head of the queue (anything passed since is behind them).
    let mut left = forwarded;
    while left > 0 {
        let take = left.min(buf.len());
        match sockopt::recv_nowait(src.sock.as_fd(), &mut buf[..take]) {
            Ok(0) => return Err(io::Error::other("peeked bytes vanished from the queue").into()),
            Ok(got) => left -= got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(from, e)),
        }
    }
    Ok(forwarded)
}

fn failed(side: Side, e: io::Error) -> Halt {
    tracing::debug!("{} side failed: {e}", side.name());
    Halt::Ended(End::Reset(side))
}

/// Waits until the peer of `from` has queued every byte given to it from `from` (redirected by
/// the kernel or written by the daemon), and, with `lag`, until no more than `lag` of them are
/// unacknowledged. Ends the flow if the peer closed (reset) meanwhile or made no progress for
/// its idle timeout.
async fn wait_until_delivered(flow: &Flow<'_, '_>, from: Side, lag: Option<u64>) -> Result<(), Halt> {
    let src = flow.end(from);
    let dst = flow.end(from.other());
    let limit = flow.timeouts.of(from.other());
    let mut delay = Duration::from_micros(50);
    let mut last = (u64::MAX, u64::MAX);
    let mut last_progress = Instant::now();
    for round in 0u32.. {
        let given = src.given_to_peer();
        let s = dst.send_state()?;
        if s.state == TCP_CLOSE {
            return Err(Halt::Ended(End::Reset(from.other())));
        }
        if s.queued >= given && lag.is_none_or(|lag| given.saturating_sub(s.acked) <= lag) {
            return Ok(());
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
