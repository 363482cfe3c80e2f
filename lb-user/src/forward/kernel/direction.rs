//! One direction of a kernel flow (bytes from `from` to its peer): the daemon's side of the
//! hand-off protocol (../../LIFECYCLE.md). Each direction runs on its own: nothing here waits
//! on the other direction.
//!
//! First, the bytes the userspace copy loop had not written ([`super::Unsent`]) are written;
//! only then may the program redirect this direction. While the program redirects, the
//! direction sleeps. It wakes when the program asks:
//! - **throttle** (the bytes in flight passed half the bound): the source's receive buffer
//!   shrinks at once (the event reader shrinks it before this task wakes, see `bpf::Wake`),
//!   so TCP's window, and what a brake would hold, shrink with it; it is given back when a
//!   hold ends or once the receiver has drained to a quarter of the bound;
//! - **held bytes** (the brake, or bytes held since the flow entered the map): it
//!   1. waits until the kernel's queue towards the peer is empty (so the held bytes cannot
//!      overtake redirected ones) and, after a brake, until the receiver has drained to the
//!      low-water mark (what it reads in 100 ms, between 1 MiB and a quarter of the bound);
//!   2. peeks at the held bytes, writes them to the peer and publishes the count (`consumed`),
//!      leaving them on the socket: their receive memory keeps the sender's window closed, so
//!      no new segment arrives that it would have to chase;
//!   3. once `consumed == passed`, takes them off (the window reopens) and sleeps: the program
//!      redirects the next segment, or signals again.
//!
//! Written bytes come off early whenever the rest of the held bytes has yet to reach the
//! socket's queue: they hold receive memory the kernel needs to queue the rest. A socket whose
//! receive memory overflowed its buffer has its held bytes taken at once (see
//! [`overcommitted`]).
//!
//! End of stream is passed on after every byte: the peer's write side is shut.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::atomic::Ordering::Relaxed,
    time::Duration,
};
use tokio::time::Instant;

use super::{pool::Buffer, Flow, Halt, TCP_CLOSE};
use crate::{
    bpf::{Interest, Slot},
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
/// After a brake, the held bytes are written once the receiver has drained the bytes in flight
/// to the low-water mark: the program then has most of the bound to redirect before the next
/// brake. The mark is what the receiver takes [`LOW_WATER_TIME`] to read, at the pace it has
/// read since the wait began, between [`MIN_LOW_WATER`] and a quarter of `max_in_flight` (the
/// quarter alone under a 4 MiB bound; the quarter until the pace is known): a slow
/// receiver needs little slack while lb writes the held bytes and hands the direction back,
/// and every hold costs lb a copy and the sender's burst that the reopened window lets in.
/// (Measured, 16 MiB bound: a reader paced at 100 MB/s got 93-98 % through the kernel with a
/// quarter, 93 % with a half, 6 % waiting for a step of room only. Readers paced at 10 MB/s,
/// medians of 3 to 5 runs: 0.13-0.15 CPU-s per GB of lb's with a quarter, 0.09-0.11 with
/// 1 MiB, 12-14 holds per 256 MiB against 16; no flow late at either pace. Most of a hold's
/// cost is the sender's burst when the window reopens: on loopback its forwarding runs in the
/// softirq of lb's read.)
const LOW_WATER_TIME: Duration = Duration::from_millis(100);
const MIN_LOW_WATER: u64 = 1 << 20;
/// The highest low-water mark, and where a throttle ends: this fraction of `max_in_flight`.
const LOW_WATER_MAX_DIVISOR: u64 = 4;
/// The receive buffer of a throttled socket while its bytes are held. Measured with a reader
/// paced at 100 MB/s (`cargo xtask bench offload`): keeping 64 KiB stalled the flow for up to
/// 5 s (held bytes the kernel could not queue); the whole buffer back (1 MiB) let the sender's
/// window reopen, and each hold copied about 1.5 MB (91 % through the kernel); 256 KiB: 93-94 %
/// with no stall; 512 KiB: 92-93 %. (128 KiB copied less per hold, ~260 KB against ~460 KB,
/// but 3 of 432 serial echo flows failed in two runs of the table: stalled until their idle
/// timeout, in the two whose log was kept.) Not easing a shrink that came in time (easing only
/// held bytes that overflowed the small buffer) kept most holds to one 64 KB segment against
/// seven, and raised the share through the kernel (one iperf3 stream 99.9 % against 99.3 %,
/// serial echo 97.9 % against 95.5 %), but halved one iperf3 stream's throughput (medians of
/// 8 alternating runs: 7.4 against 14.3 Gbit/s; with TCP_QUICKACK after each hold, 9.6): the
/// sender's window closes during the hold, and no window update comes when it ends.
const HOLD_RCVBUF: u32 = 256 << 10;
/// Bounds of a wait for a receiver to drain (see [`Pace`]).
const MIN_PACE_WAIT: Duration = Duration::from_millis(1);
const MAX_PACE_WAIT: Duration = Duration::from_millis(250);
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
    /// Look again after this long, or when the program or the socket signals.
    Wait(Duration),
}

/// Where a direction starts: a flow entering the kernel path, with the bytes of this
/// direction the userspace copy loop had read and not written (the program holds the
/// direction until they are written); or a flow moved in from another process (an upgrade),
/// or back after a move that failed.
pub(super) enum Start {
    Fresh(Vec<u8>),
    Resumed(DirectionState),
}

/// A direction's state when its flow moves to another process (an upgrade): what the copying
/// of held bytes had done (the rest is in the control slot and on the socket).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum DirectionState {
    /// Forwarding, possibly in a hold.
    Forwarding {
        /// Held bytes taken off the socket (see [`Copier`]).
        dequeued: u64,
        /// Of those, bytes taken off and not written yet (an overcommitted socket's).
        #[serde(with = "base64_bytes")]
        pending: Vec<u8>,
        /// Since the brake, the receiver drained to the low-water mark.
        released: bool,
        /// The socket is watched for input (held bytes on their way to its queue).
        watching_input: bool,
        /// In a hold (its end gives a throttled buffer back).
        in_hold: bool,
    },
    /// Its end of stream came: once every byte is delivered, the peer's write side is shut.
    Closing,
    /// Its end of stream was passed on.
    Done,
}

/// Held bytes in a hand-over message: base64, not a JSON array of numbers.
mod base64_bytes {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Forwards one direction until its end of stream has been passed on (`Ok`), or the flow
/// stops, or moves (`Err(Halt::Moved)`, at a point where nothing is half written).
pub(super) async fn run(flow: &Flow<'_, '_>, from: Side, start: Start) -> Result<(), Halt> {
    let src = flow.end(from);
    let mut copy = Copier::default();
    let mut closing = false;
    match start {
        Start::Fresh(unsent) => {
            if !unsent.is_empty() {
                // Outside the map's accounting: the destination's baseline counts them already.
                write_all(flow, from.other(), &unsent, None, false).await?;
                flow.counters.user_bytes.add(unsent.len() as u64);
                drop(unsent);
                src.tracked.ctl().allow_redirect();
            }
        }
        Start::Resumed(DirectionState::Done) => {
            // Its end of stream is in already: watching for it would wake at once, forever.
            src.watch.set_interest(Interest::ErrorsOnly);
            return Ok(());
        }
        Start::Resumed(DirectionState::Closing) => closing = true,
        Start::Resumed(DirectionState::Forwarding {
            dequeued,
            pending,
            released,
            watching_input,
            in_hold,
        }) => {
            let end = pending.len();
            if end > 0 {
                copy.buf.at_least(end)[..end].copy_from_slice(&pending);
            }
            let hold_start = in_hold.then(|| (Instant::now(), src.tracked.ctl().consumed()));
            copy = Copier {
                end,
                dequeued,
                released,
                watching_input,
                hold_start,
                ..copy
            };
            if watching_input {
                src.watch.set_interest(Interest::Input);
            }
        }
    }
    // The reader of the program's events may shrink the socket's buffer for a throttle
    // request from now on (see `bpf::Wake`); it is given back here.
    let _attached = src.tracked.wake().attach(src.sock.as_raw_fd());
    while !closing {
        // Between two pumps nothing is half done: a move takes the direction from here.
        if flow.moving.is_cancelled() {
            return Err(Halt::Moved(copy.state()));
        }
        // Boxed: copying is rare (brakes, end of stream) and its state is large; an idle
        // direction, the common case for many flows, keeps only the wait below.
        let pumped = match Box::pin(pump(flow, from, &mut copy)).await {
            Err(Halt::Move) => return Err(Halt::Moved(copy.state())),
            r => r?,
        };
        match pumped {
            Pumped::EndOfStream => closing = true,
            Pumped::More => tokio::task::yield_now().await,
            Pumped::Idle => tokio::select! {
                r = src.watch.wait() => r?,
                () = flow.moving.cancelled() => {}
            },
            Pumped::Wait(d) => tokio::select! {
                r = src.watch.wait() => r?,
                _ = tokio::time::sleep(d) => {}
                () = flow.moving.cancelled() => {}
            },
        }
    }
    src.watch.set_interest(Interest::ErrorsOnly);
    if flow.drops(from) {
        // Nothing of it went on, nor does its end (see Directions::ServerToClient).
        return Ok(());
    }
    match Box::pin(wait_until_delivered(flow, from, None)).await {
        Err(Halt::Move) => return Err(Halt::Moved(DirectionState::Closing)),
        r => r?,
    };
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

/// A held direction's copying state. Its counts are of held bytes since the flow entered the
/// map, like the control slot's: `consumed` (published there) is what the daemon wrote to the
/// peer, `dequeued` what it took off the socket.
///
/// The daemon writes held bytes it *peeks* at, and takes them off the socket only once it has
/// caught up (`consumed == passed`): until then they stay charged to the socket's receive
/// buffer, TCP's window stays closed, and the sender cannot add segments the daemon would have
/// to chase (a sender faster than lb's copy would otherwise keep the direction out of the
/// kernel for good). Bytes taken off before they were written (an overcommitted socket, see
/// [`overcommitted`]) wait in `buf[start..end]`; they and written-but-queued bytes never
/// exist at the same time.
#[derive(Default)]
struct Copier {
    buf: Buffer,
    start: usize,
    end: usize,
    /// Held bytes taken off the socket (kept across releases).
    dequeued: u64,
    /// Peeks and discards land here (taken from the pool only while bytes are held).
    scratch: Buffer,
    watching_input: bool,
    /// Since the brake, the receiver has drained to the low-water mark: copy with any room.
    released: bool,
    /// A throttle request under way (kept across releases).
    throttle: Option<Throttle>,
    /// When this hold began, and `consumed` then (for its trace line).
    hold_start: Option<(Instant, u64)>,
}

/// A throttle request under way: the receiver's pace since this task saw it.
#[derive(Clone, Copy)]
struct Throttle {
    pace: Pace,
}

/// How fast a receiver acknowledges: from the first look, to tell how long it needs for the
/// rest (a slow reader may take seconds; polling it would cost more than its bytes).
#[derive(Clone, Copy)]
struct Pace {
    since: Instant,
    acked: u64,
}

impl Pace {
    fn start(acked: u64) -> Pace {
        Pace {
            since: Instant::now(),
            acked,
        }
    }

    /// About how long until `left` more bytes are acknowledged, now that `acked` are: three
    /// quarters of the estimate (a pace that quickens is not overslept), between
    /// [`MIN_PACE_WAIT`] and [`MAX_PACE_WAIT`].
    fn wait_for(&self, acked: u64, left: u64) -> Duration {
        let need = match self.rate(acked) {
            Some(rate) => Duration::from_secs_f64(0.75 * left as f64 / rate),
            // Nothing acknowledged yet: back off as the silence lasts.
            None => self.since.elapsed(),
        };
        need.clamp(MIN_PACE_WAIT, MAX_PACE_WAIT)
    }

    /// Bytes acknowledged per second since the first look, if any were.
    fn rate(&self, acked: u64) -> Option<f64> {
        let moved = acked.saturating_sub(self.acked);
        (moved > 0).then(|| moved as f64 / self.since.elapsed().as_secs_f64().max(1e-6))
    }
}

impl Copier {
    fn pending(&self) -> u64 {
        (self.end - self.start) as u64
    }

    /// What a move takes along (the hold's timing and the throttle's pace start again).
    fn state(&self) -> DirectionState {
        DirectionState::Forwarding {
            dequeued: self.dequeued,
            pending: self.buf.as_slice()[self.start..self.end].to_vec(),
            released: self.released,
            watching_input: self.watching_input,
            in_hold: self.hold_start.is_some(),
        }
    }
}

/// Copies what the program held, up to [`ROUNDS`] rounds.
async fn pump(flow: &Flow<'_, '_>, from: Side, copy: &mut Copier) -> Result<Pumped, Halt> {
    let src = flow.end(from);
    let ctl = src.tracked.ctl();
    let fd = src.sock.as_fd();
    for _ in 0..ROUNDS {
        let (passed, consumed) = (ctl.passed(), ctl.consumed());
        if passed == consumed {
            // Caught up: the written bytes come off the socket (which reopens the sender's
            // window), and the program redirects the next segment (or signals again). A hold
            // that ends gives a throttled socket its buffer back first, before the read that
            // reopens the window: left small until the low-water mark, a reader paced at
            // 100 MB/s ran late by up to 0.25 s in 2 of 3 runs, none in 3 with the buffer back.
            // The next request shrinks it again, at once (the event reader does).
            if copy.hold_start.is_some() {
                copy.throttle = None;
                src.tracked
                    .wake()
                    .end_throttle(fd, || ctl.set_throttles_done(ctl.throttles()))
                    .map_err(|e| failed(from, e))?;
            }
            discard_written(copy, fd, consumed).map_err(|e| failed(from, e))?;
            if copy.watching_input {
                src.watch.set_interest(Interest::EndOfStream);
            }
            if let Some((since, at)) = copy.hold_start {
                tracing::trace!(
                    "from {}: hold over, {} bytes copied in {:?}",
                    from.name(),
                    consumed - at,
                    since.elapsed()
                );
            }
            *copy = Copier {
                dequeued: copy.dequeued,
                throttle: copy.throttle,
                ..Copier::default()
            };
            flow.note_braked(from, false);
            // Only an end of stream or an error can be waiting (or a segment passed since).
            // (Before the throttle: an end of stream keeps the socket's hang-up signalled, so
            // a throttle's wait would wake at once, again and again; and it ends the throttle.)
            return match sockopt::peek_nowait(fd, &mut [0u8; 1]) {
                // A segment passed since the counts were read comes first.
                Ok(0) if ctl.passed() != consumed => continue,
                Ok(0) => Ok(Pumped::EndOfStream),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match throttle(flow, from, copy).map_err(|e| failed(from, e))? {
                        Some(later) => Ok(Pumped::Wait(later)),
                        None => Ok(Pumped::Idle),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(failed(from, e)),
            };
        }
        if flow.drops(from) {
            // Nothing to keep in order: read and count.
            match take_off(copy, fd, (passed - copy.dequeued).min(DROP_STEP as u64), false) {
                Ok(n) => {
                    flow.discarded.fetch_add(n, Relaxed);
                    ctl.set_consumed(consumed + n);
                    continue;
                }
                Err(e) => match held_error(flow, from, copy, e)? {
                    Some(idle) => return Ok(idle),
                    None => continue,
                },
            }
        }
        // Braked: the kernel had redirected this direction's bytes and stopped.
        if ctl.redirected() > 0 {
            flow.note_braked(from, true);
        }
        // A throttle's small buffer is eased while bytes are held: held and peeked bytes are
        // charged to it, and the kernel cannot queue held bytes past it (the window advertised
        // before the shrink may still bring some). Not all the way back: the sender's window
        // would reopen, and the daemon would copy all of it. The request stays open: once
        // the hold is over, the whole buffer goes back.
        // (Shrunk by this task or by the event reader; never above the socket's own buffer.)
        src.tracked
            .wake()
            .ease(fd, HOLD_RCVBUF)
            .map_err(|e| failed(from, e))?;
        if !copy.released {
            // Once per hold, at its start: the most this direction has inside lb.
            let (unacked, _) = flow.in_flight(from).map_err(|e| failed(from.other(), e))?;
            flow.note_in_flight(from, unacked);
            if copy.hold_start.is_none() {
                copy.hold_start = Some((Instant::now(), consumed));
                tracing::trace!(
                    "from {}: hold, {} held, {unacked} unacknowledged, braked {}, throttle {}",
                    from.name(),
                    passed - consumed,
                    ctl.redirected() > 0,
                    match src.tracked.wake().shrunk() {
                        false => "none",
                        true => "shrunk",
                    }
                );
            }
        }
        let max = u64::from(ctl.max_in_flight());
        if copy.pending() < max && overcommitted(fd).map_err(|e| failed(from, e))? {
            // Take the excess off the socket now, whatever the peer's room (the bytes written
            // already first: they are not to be written again).
            discard_written(copy, fd, consumed).map_err(|e| failed(from, e))?;
            let want = (max - copy.pending()).min(passed - copy.dequeued);
            match take_off(copy, fd, want, true) {
                Ok(_) => {}
                // Not queued yet (or only the end of stream is): the peek below tells.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::UnexpectedEof
                    ) => {}
                Err(e) => return Err(failed(from, e)),
            }
        }
        // After a brake the receiver first drains to the low-water mark, so that once the held
        // bytes are written the program has a whole cycle of room to redirect; bytes held for
        // another reason (since the flow entered the map) need only a step of room.
        let drain = if copy.released || ctl.redirected() == 0 {
            Drain::Under(max.saturating_sub(STEP))
        } else {
            Drain::LowWater { max }
        };
        let source = Source::of(copy, ctl, fd, max);
        let Some(lag) = wait_until_delivered(flow, from, Some((drain, source))).await? else {
            // The source's receive memory overflowed meanwhile: its bytes come off first
            // (above), then the wait goes on. (A pause first: should none be queued yet, this
            // does not spin.)
            tracing::debug!(
                "from {}: receive memory overflowed while held bytes waited",
                from.name()
            );
            tokio::time::sleep(MIN_PACE_WAIT).await;
            continue;
        };
        copy.released = true;
        let room = max.saturating_sub(lag).max(1);
        if copy.pending() > 0 {
            let n = copy.pending().min(room) as usize;
            let source = Source::of(copy, ctl, fd, max);
            let bytes = &copy.buf.as_slice()[copy.start..copy.start + n];
            let written = write_all(flow, from.other(), bytes, source, true).await?;
            copy.start += written;
            publish(flow, from, written as u64);
            if written < n {
                // Cut short by an overflow: its bytes come off first (above).
                tokio::time::sleep(MIN_PACE_WAIT).await;
            }
            continue;
        }
        // Peek from the socket's head (`dequeued`), past what is written already.
        let skip = consumed - copy.dequeued;
        if skip >= MAX_COPY as u64 / 2 {
            discard_written(copy, fd, consumed).map_err(|e| failed(from, e))?;
            continue;
        }
        let want = (passed - copy.dequeued).min(skip + room).min(MAX_COPY as u64) as usize;
        let peeked = match sockopt::peek_nowait(fd, &mut copy.scratch.at_least(want)[..want]) {
            // The sender's FIN is in, and held bytes before it are still on their way to the
            // socket's queue (the psock's backlog worker moves them).
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) if (n as u64) <= skip => Err(io::ErrorKind::WouldBlock.into()),
            r => r,
        };
        match peeked {
            Ok(n) => {
                let source = Source::of(copy, ctl, fd, max);
                let bytes = &copy.scratch.as_slice()[skip as usize..n];
                let written = write_all(flow, from.other(), bytes, source, true).await?;
                publish(flow, from, written as u64);
                if written < bytes.len() {
                    // Cut short by an overflow: its bytes come off first (above).
                    tokio::time::sleep(MIN_PACE_WAIT).await;
                }
            }
            Err(e) => {
                if let Some(idle) = held_error(flow, from, copy, e)? {
                    return Ok(idle);
                }
            }
        }
    }
    Ok(Pumped::More)
}

/// The throttle (see `SockCtl::throttles`): when the program asks, the source's receive buffer
/// shrinks at once to [`crate::bpf::THROTTLE_RCVBUF`] (usually the event reader has shrunk it
/// already), so TCP's window, and what a brake would hold, shrink with it. Once the receiver
/// has drained to a quarter of the bound the buffer is given back and the request marked done (a
/// hold that ends does the same, in [`pump`]). `Some(d)`: look again in `d`.
///
/// No measurement comes first: the program asks half way to the brake, and a fast sender fills
/// the other half within 2 to 6 ms (loopback), before a measurement of the receiver's pace
/// could tell; a brake then holds the whole window (about 2 MB copied, against about 0.5 MB
/// after a shrink). The small buffer costs a fast receiver little: on loopback the program
/// takes each segment off the queue as it comes, and shrunk senders were seen to move 8 MB in
/// 3.5 ms. A request found already drained is marked done as it is.
fn throttle(flow: &Flow<'_, '_>, from: Side, copy: &mut Copier) -> io::Result<Option<Duration>> {
    let src = flow.end(from);
    let ctl = src.tracked.ctl();
    let fd = src.sock.as_fd();
    let asked = ctl.throttles();
    let (in_flight, acked) = match copy.throttle {
        None if asked == ctl.throttles_done() => return Ok(None),
        _ => flow.in_flight(from)?,
    };
    flow.note_in_flight(from, in_flight);
    let low = u64::from(ctl.max_in_flight()) / LOW_WATER_MAX_DIVISOR;
    let wake = src.tracked.wake();
    if in_flight > low {
        let throttle = match &mut copy.throttle {
            Some(t) => t,
            None => {
                tracing::trace!(
                    "from {}: throttle at {in_flight} in flight, shrunk already: {}",
                    from.name(),
                    wake.shrunk()
                );
                wake.shrink(fd)?;
                copy.throttle.insert(Throttle {
                    pace: Pace::start(acked),
                })
            }
        };
        return Ok(Some(throttle.pace.wait_for(acked, in_flight - low)));
    }
    copy.throttle = None;
    tracing::trace!("from {}: throttle over at {in_flight} in flight", from.name());
    wake.end_throttle(fd, || ctl.set_throttles_done(asked))?;
    Ok(None)
}

/// What a failed read of held bytes means: counted by the program but not queued yet (wait
/// for the socket to report them: `Some(Idle)`), try again (`None`), or the side failed.
fn held_error(
    flow: &Flow<'_, '_>,
    from: Side,
    copy: &mut Copier,
    e: io::Error,
) -> Result<Option<Pumped>, Halt> {
    let src = flow.end(from);
    match e.kind() {
        io::ErrorKind::WouldBlock => {
            // The bytes written and still queued come off first: they take receive memory the
            // kernel needs to queue the rest (it waits for room, the daemon for the bytes), and
            // they keep the socket readable, which would wake the daemon again and again.
            discard_written(copy, src.sock.as_fd(), src.tracked.ctl().consumed())
                .map_err(|e| failed(from, e))?;
            if !copy.watching_input {
                src.watch.set_interest(Interest::Input);
                copy.watching_input = true;
            }
            Ok(Some(Pumped::Idle))
        }
        io::ErrorKind::UnexpectedEof => {
            // The end of stream keeps the socket readable (and hung up): only time tells when
            // the rest has arrived.
            discard_written(copy, src.sock.as_fd(), src.tracked.ctl().consumed())
                .map_err(|e| failed(from, e))?;
            src.watch.set_interest(Interest::ErrorsOnly);
            copy.watching_input = true;
            Ok(Some(Pumped::Wait(MIN_PACE_WAIT)))
        }
        io::ErrorKind::Interrupted => Ok(None),
        _ => Err(failed(from, e)),
    }
}

/// Publishes `n` more held bytes of `from` as written to the peer (after the write: until
/// then the program keeps holding newer segments behind them).
fn publish(flow: &Flow<'_, '_>, from: Side, n: u64) {
    let ctl = flow.end(from).tracked.ctl();
    flow.counters.user_bytes.add(n);
    ctl.set_consumed(ctl.consumed() + n);
}

/// Takes the bytes written but still queued off the socket, up to `consumed`.
fn discard_written(copy: &mut Copier, fd: BorrowedFd<'_>, consumed: u64) -> io::Result<()> {
    while copy.dequeued < consumed {
        let want = (consumed - copy.dequeued).min(MAX_COPY as u64) as usize;
        match sockopt::recv_nowait(fd, &mut copy.scratch.at_least(want)[..want]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => copy.dequeued += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The rest comes off on a later round.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Takes up to `want` held bytes off the socket (at most [`MAX_COPY`]; none may be written
/// already); `keep`: into the pending buffer (else they are dropped). The read asks for
/// no more than the program counted, so no byte that bypassed it can be forwarded.
fn take_off(copy: &mut Copier, fd: BorrowedFd<'_>, want: u64, keep: bool) -> io::Result<u64> {
    let want = want.min(MAX_COPY as u64) as usize;
    if want == 0 {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    let n = if keep {
        // What is pending moves to the front first.
        let end = copy.end - copy.start;
        let buf = copy.buf.at_least(end + want);
        if copy.start > 0 {
            buf.copy_within(copy.start..copy.end, 0);
            (copy.start, copy.end) = (0, end);
        }
        let n = sockopt::recv_nowait(fd, &mut buf[end..end + want])?;
        copy.end += n;
        n
    } else {
        sockopt::recv_nowait(fd, &mut copy.scratch.at_least(want)[..want])?
    };
    if n == 0 {
        // See the peek in `pump`: held bytes still on their way.
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    copy.dequeued += n as u64;
    Ok(n as u64)
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
fn overcommitted(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let (allocated, size) = sockopt::receive_memory(fd)?;
    Ok(allocated > size)
}

fn failed(side: Side, e: io::Error) -> Halt {
    tracing::debug!("{} side failed: {e}", side.name());
    Halt::Ended(End::Reset(side))
}

/// How far the receiver must drain (see [`wait_until_delivered`]).
#[derive(Clone, Copy)]
enum Drain {
    /// To no more than this many unacknowledged bytes.
    Under(u64),
    /// To the low-water mark under a bound of `max` (see [`LOW_WATER_TIME`]).
    LowWater { max: u64 },
}

impl Drain {
    /// The most unacknowledged bytes to wait for; `rate`: the receiver's pace, once known.
    fn bytes(self, rate: Option<f64>) -> u64 {
        match self {
            Drain::Under(n) => n,
            Drain::LowWater { max } => {
                let quarter = max / LOW_WATER_MAX_DIVISOR;
                match rate {
                    // Until the pace is known, the highest mark: no later than before.
                    None => quarter,
                    Some(rate) => ((rate * LOW_WATER_TIME.as_secs_f64()) as u64)
                        .min(quarter)
                        .max(MIN_LOW_WATER.min(quarter)),
                }
            }
        }
    }
}

/// Waits until the peer of `from` has queued every byte given to it from `from` (redirected by
/// the kernel or written by the daemon), and, with `hold`, until the receiver has drained the
/// unacknowledged ones to its mark; returns how many are then. Waiting for the receiver (not
/// merely for the kernel to queue redirected bytes) marks the direction braked. Ends the flow
/// if the peer closed (reset) meanwhile or made no progress for its idle timeout.
///
/// `hold`: the mark, and the source whose held bytes wait meanwhile (see [`Source`]); `None` is
/// returned early if they are to be taken off it.
async fn wait_until_delivered(
    flow: &Flow<'_, '_>,
    from: Side,
    hold: Option<(Drain, Option<Source<'_>>)>,
) -> Result<Option<u64>, Halt> {
    let drain = hold.map(|(d, _)| d);
    let source = hold.and_then(|(_, s)| s);
    let dst = flow.end(from.other());
    let limit = flow.timeouts.of(from.other());
    let mut last = (u64::MAX, u64::MAX);
    let started = Instant::now();
    let mut last_progress = started;
    let mut pace = None;
    let mut queue_pace = None;
    let mut noted = false;
    for round in 0u32.. {
        // Nothing is half written while this waits: a move may take the direction.
        if flow.moving.is_cancelled() {
            return Err(Halt::Move);
        }
        let given = flow.given_to_peer(from);
        let s = dst.send_state()?;
        if s.state == TCP_CLOSE {
            return Err(Halt::Ended(End::Reset(from.other())));
        }
        let unacked = given.saturating_sub(s.acked);
        let lag = drain.map(|d| d.bytes(pace.and_then(|p: Pace| p.rate(s.acked))));
        let room = lag.is_none_or(|lag| unacked <= lag);
        if s.queued >= given && room {
            return Ok(Some(unacked));
        }
        if !room && !noted {
            flow.note_braked(from, true);
            noted = true;
        }
        if (s.queued, s.acked) != last {
            last = (s.queued, s.acked);
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= limit {
            return Err(Halt::Ended(End::IdleTimeout(from.other())));
        }
        // Looked at before each sleep only: a spin (below) is short, and a system call per
        // round of it would double its cost.
        let spin = room && round < SPIN_ROUNDS && given - s.queued < STEP;
        if !spin && Source::overflowed(source, from)? {
            return Ok(None);
        }
        if let (false, Some(lag)) = (room, lag) {
            // Waiting for the receiver, which reads at its own pace.
            let pace = *pace.get_or_insert(Pace::start(s.acked));
            tokio::select! {
                _ = tokio::time::sleep(pace.wait_for(s.acked, unacked - lag)) => {}
                () = flow.moving.cancelled() => {}
            }
            continue;
        }
        // The kernel worker usually catches up within microseconds, and a braked sender waits
        // for this: yield to other tasks for a while before sleeping (a tokio sleep lasts at
        // least a millisecond). Many bytes behind, it moves at the receiver's pace.
        let left = given - s.queued;
        if spin {
            tokio::task::yield_now().await;
        } else {
            let pace = *queue_pace.get_or_insert(Pace::start(s.queued));
            tokio::select! {
                _ = tokio::time::sleep(pace.wait_for(s.queued, left)) => {}
                () = flow.moving.cancelled() => {}
            }
        }
    }
    unreachable!("the loop above only ends by returning")
}

/// The source socket of a hold, as seen by a wait or a write for it: they stop early when its
/// receive memory has overflowed its buffer (see [`overcommitted`]) and held bytes can be taken
/// off it. Until they are, it also drops the acknowledgements of the other direction's bytes,
/// and the receiver waited for may wait on those (a serial server does not read while its
/// write is blocked). `None` when nothing could be taken (the pending buffer is full): the
/// wait goes on as before.
#[derive(Clone, Copy)]
struct Source<'a> {
    fd: BorrowedFd<'a>,
    ctl: &'a Slot<'a>,
    dequeued: u64,
}

impl<'a> Source<'a> {
    fn of(copy: &Copier, ctl: &'a Slot<'a>, fd: BorrowedFd<'a>, max: u64) -> Option<Source<'a>> {
        (copy.pending() < max).then_some(Source {
            fd,
            ctl,
            dequeued: copy.dequeued,
        })
    }

    /// Whether `source` (if any) overflowed with held bytes on it.
    fn overflowed(source: Option<Source<'_>>, from: Side) -> Result<bool, Halt> {
        match source {
            Some(s) if s.ctl.passed() > s.dequeued => overcommitted(s.fd).map_err(|e| failed(from, e)),
            _ => Ok(false),
        }
    }
}

/// Writes bytes to side `to` outside tokio's reactor, polling while its send buffer is full;
/// returns how many it wrote: all of them, or fewer if the `source` of held bytes overflowed
/// while it polled (see [`Source`]). Ends the flow if the socket failed, or stayed full for
/// `to`'s idle timeout.
async fn write_all(
    flow: &Flow<'_, '_>,
    to: Side,
    bytes: &[u8],
    source: Option<Source<'_>>,
    stoppable: bool,
) -> Result<usize, Halt> {
    let dst = flow.end(to);
    let limit = flow.timeouts.of(to);
    let mut delay = Duration::from_micros(50);
    let mut last_progress = Instant::now();
    let mut written = 0;
    while written < bytes.len() {
        match sockopt::send_nowait(dst.sock.as_fd(), &bytes[written..]) {
            Ok(n) => {
                written += n;
                last_progress = Instant::now();
                delay = Duration::from_micros(50);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if last_progress.elapsed() >= limit {
                    return Err(Halt::Ended(End::IdleTimeout(to)));
                }
                // A move does not wait for a slow receiver: what is written is published by
                // the caller, and the rest is written after the move (`stoppable`: the caller
                // publishes a partial write).
                if stoppable && flow.moving.is_cancelled() {
                    return Ok(written);
                }
                if Source::overflowed(source, to.other())? {
                    tracing::debug!(
                        "from {}: receive memory overflowed during a write",
                        to.other().name()
                    );
                    return Ok(written);
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_POLL);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(to, e)),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_low_water_mark_follows_the_receivers_pace_within_its_bounds() {
        let low = |max, rate| Drain::LowWater { max }.bytes(rate);
        // Pace unknown: a quarter of the bound, as high as the mark goes.
        assert_eq!(low(16 * MIB, None), 4 * MIB);
        // 100 ms of reading, between 1 MiB and a quarter of the bound.
        assert_eq!(low(16 * MIB, Some(20e6)), 2_000_000);
        assert_eq!(low(16 * MIB, Some(10e6)), MIB);
        assert_eq!(low(16 * MIB, Some(1e9)), 4 * MIB);
        // A bound under 4 MiB: never above its quarter.
        assert_eq!(low(2 * MIB, Some(10e6)), MIB / 2);
        assert_eq!(low(2 * MIB, None), MIB / 2);
        // A fixed mark ignores the pace.
        assert_eq!(Drain::Under(3 * MIB).bytes(Some(1e3)), 3 * MIB);
    }
}
