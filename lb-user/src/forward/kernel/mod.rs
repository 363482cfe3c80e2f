//! Kernel forwarding of one established flow through the BPF SOCKHASH.
//!
//! Set-up: give both sockets a control slot (redirecting allowed but see below, braking above
//! `flow_control.max_in_flight`), record each socket's send baseline, insert both sockets (each
//! under its peer's cookie), then "kick" each so bytes queued before insertion run through the
//! verdict program. After that each direction ([`direction`]) sleeps until the program signals
//! it (a brake, or bytes held for the daemon) or its source socket reports end of stream or an
//! error; redirected data never wakes the daemon. One timer watches the idle timeouts.
//!
//! With [`Directions::ServerToClient`] (the rest of an HTTP response after which lb closes),
//! the client's slot never allows redirecting: the program holds every byte the client sends,
//! and the daemon reads and drops them instead of writing them to the server; the client's end
//! of stream is not passed on either.
//!
//! The kernel does not pass FIN on, and it sends redirected bytes from a worker after the
//! verdict: on end of stream from one side, the daemon waits until the peer's TCP send counters
//! show every byte from that side queued, and only then shuts the peer's write side.
//!
//! The hand-off protocol between program and daemon is drawn in ../../LIFECYCLE.md.
mod direction;
#[cfg(test)]
mod model;
mod pool;

use prometheus_client::metrics::counter::Counter;
use std::{
    io,
    net::TcpStream,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::Duration,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use direction::DirectionState;
use direction::Start;

use super::{ByteCounters, Directions, End, Side, Timeouts, Totals, Unsent};
use crate::{
    bpf::{Kernel, LiveCount, TrackError, Tracked, Watch},
    sockopt,
};

/// TCP states from include/net/tcp_states.h (libc does not export them).
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;

/// Per-flow settings of the kernel path.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// SO_SNDBUF for both sockets (`tune.kernel_sndbuf`); `None` keeps autotuning.
    pub sndbuf: Option<u32>,
    /// The congestion control of both sockets (`tune.kernel_congestion`); `None` keeps theirs.
    pub congestion: Option<&'a str>,
    /// The brake (`flow_control.max_in_flight`).
    pub max_in_flight: u32,
}

/// Counters a flow adds to.
pub struct FlowCounters<'a> {
    /// Bytes the daemon copied itself (`lb_forwarded_bytes_total{path="user"}`).
    pub user_bytes: ByteCounters<'a>,
    /// Bytes lb had accepted from one side and could not deliver because the other failed
    /// (`lb_dropped_bytes_total{listener}`).
    pub dropped: &'a Counter,
    /// Bytes the program saw twice (`lb_kernel_duplicated_bytes_total`).
    pub duplicated: &'a Counter,
    /// The server's kernel bytes (`lb_server_forwarded_bytes_total{path="kernel"}`), counted
    /// while the flow runs ([`Kernel::count_live`]).
    pub kernel_bytes: &'a Counter,
}

/// One socket of a kernel-forwarded flow.
struct FlowSocket<'k> {
    sock: TcpStream,
    tracked: Tracked<'k>,
    /// Bytes the socket had been given to send before the flow entered the map (an active
    /// opener's SYN counts as one).
    baseline: u64,
    /// Bytes the socket had received and lb had read before the flow entered the map: the
    /// program sees everything after them.
    received_base: u64,
    /// Reports this socket's end of stream and errors (and input while its bytes are copied),
    /// and the program's signals for it.
    watch: Watch<'k>,
}

/// Where a socket's sending stands, relative to the flow's start in the map.
struct SendState {
    /// Bytes given to the socket to send since insertion.
    queued: u64,
    /// Of those, bytes its peer acknowledged.
    acked: u64,
    /// Bytes queued and not acknowledged (SIOCOUTQ).
    unacked: u64,
    state: u8,
}

impl FlowSocket<'_> {
    fn send_state(&self) -> io::Result<SendState> {
        let p = sockopt::send_progress(self.sock.as_fd())?;
        let acked_total = p.queued_total - p.unacked;
        Ok(SendState {
            queued: p.queued_total.saturating_sub(self.baseline),
            acked: acked_total.saturating_sub(self.baseline),
            unacked: p.unacked,
            state: p.state,
        })
    }
}

/// A flow while it is in the SOCKHASH. Dropping it removes both entries and closes the
/// sockets, with a reset unless [`Flow::close`] found the streams complete: an aborted flow
/// (lb stopping) or one with undelivered bytes must not look like a clean end to either peer.
struct Flow<'k, 'c> {
    kernel: &'k Kernel,
    /// Counts the flow's kernel bytes as they go. Before `ends`: fields drop in order, and the
    /// last count reads the slots, which must still be the flow's.
    live: LiveCount<'k>,
    ends: [FlowSocket<'k>; 2],
    timeouts: Timeouts,
    counters: &'c FlowCounters<'c>,
    /// Per direction (by source side): its bytes are held and being copied after a brake.
    braked: [AtomicBool; 2],
    /// The side whose bytes are read and dropped ([`Directions::dropped`]).
    dropped: Option<Side>,
    /// Of that side's `consumed` bytes, those dropped (all of them: none goes to the peer).
    discarded: AtomicU64,
    reset_on_drop: bool,
    /// Cancelled when an upgrade moves the kernel flows to a new process: each direction
    /// stops at a point where nothing is half written ([`direction`]).
    moving: &'c CancellationToken,
}

impl Drop for Flow<'_, '_> {
    fn drop(&mut self) {
        for end in &self.ends {
            self.kernel.remove(end.tracked.cookie);
        }
        if self.braked.iter().any(|b| b.load(Relaxed)) {
            self.kernel.set_braked(false);
        }
        self.kernel.flow_ended();
        if self.reset_on_drop {
            for end in &self.ends {
                let _ = socket2::SockRef::from(&end.sock).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

impl Flow<'_, '_> {
    fn end(&self, side: Side) -> &FlowSocket<'_> {
        &self.ends[side.index()]
    }

    /// Whether `from`'s bytes are dropped rather than forwarded.
    fn drops(&self, from: Side) -> bool {
        self.dropped == Some(from)
    }

    /// Every byte that came from `from` after insertion and went to its peer, redirected by
    /// the program or written by the daemon.
    fn given_to_peer(&self, from: Side) -> u64 {
        let ctl = self.end(from).tracked.ctl();
        let discarded = if self.drops(from) {
            self.discarded.load(Relaxed)
        } else {
            0
        };
        (ctl.redirected() + ctl.consumed()).saturating_sub(discarded)
    }

    /// Bytes given to `from`'s peer that its receiver has not acknowledged (what lb holds for
    /// this direction, in the peer's psock and send queues), and the bytes it acknowledged.
    fn in_flight(&self, from: Side) -> io::Result<(u64, u64)> {
        let acked = self.end(from.other()).send_state()?.acked;
        Ok((self.given_to_peer(from).saturating_sub(acked), acked))
    }

    /// Records what `from`'s direction has inside lb now, `unacked` at its peer plus what is
    /// held on its own socket, for the most-in-flight gauge.
    fn note_in_flight(&self, from: Side, unacked: u64) {
        let ctl = self.end(from).tracked.ctl();
        let held = ctl.passed().saturating_sub(ctl.consumed());
        self.kernel.note_in_flight(unacked + held);
    }

    /// Logs where each direction stands (at debug level), for a flow that ends abnormally.
    fn log_state(&self, why: &str) {
        for from in [Side::Client, Side::Server] {
            let src = self.end(from);
            let ctl = src.tracked.ctl();
            let dst = self.end(from.other()).send_state();
            let (rmem, rcvbuf) = sockopt::receive_memory(src.sock.as_fd()).unwrap_or_default();
            tracing::debug!(
                "{why}: from {}: redirected {} passed {} consumed {} throttles {}/{}; source rmem {rmem}/{rcvbuf}, inq {:?}; peer queued {:?} acked {:?} unacked {:?}",
                from.name(),
                ctl.redirected(),
                ctl.passed(),
                ctl.consumed(),
                ctl.throttles(),
                ctl.throttles_done(),
                sockopt::inq(src.sock.as_fd()).ok(),
                dst.as_ref().map(|s| s.queued).ok(),
                dst.as_ref().map(|s| s.acked).ok(),
                dst.as_ref().map(|s| s.unacked).ok(),
            );
        }
    }

    /// Notes that `from`'s direction is (or no longer is) braked, for the braked-flows gauge.
    fn note_braked(&self, from: Side, braked: bool) {
        if self.braked[from.index()].swap(braked, Relaxed) == braked {
            return;
        }
        let other = self.braked[from.other().index()].load(Relaxed);
        if !other {
            self.kernel.set_braked(braked);
        }
    }

    /// Takes the flow out of this process's hands, its sockets left in the maps with their
    /// slots (an upgrade moves it): no reset, no removal, and this process's epoll set and
    /// wake-ups forget its sockets.
    fn into_moving(self, directions: [DirectionState; 2]) -> Moving {
        for end in &self.ends {
            end.watch.forget();
        }
        if self.braked.iter().any(|b| b.load(Relaxed)) {
            self.kernel.set_braked(false);
        }
        self.kernel.flow_moved();
        self.kernel.flow_ended();
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again; every field with a destructor is
        // read out exactly once here (the others are references, atomics and plain values).
        // The live count first: it adds the bytes redirected so far while the slots are still
        // this flow's.
        drop(unsafe { std::ptr::read(&this.live) });
        let ends = unsafe { std::ptr::read(&this.ends) };
        let [c, s] = ends.map(|e| {
            let FlowSocket {
                sock,
                tracked,
                baseline,
                received_base,
                watch,
            } = e;
            drop(watch);
            (
                sock,
                MovedEnd {
                    tracked: tracked.detach(),
                    baseline,
                    received_base,
                },
            )
        });
        Moving {
            client: c.0,
            server: s.0,
            state: MovedState {
                ends: [c.1, s.1],
                timeouts: this.timeouts,
                dropped: this.dropped,
                discarded: this.discarded.load(Relaxed),
                braked: [0, 1].map(|i| this.braked[i].load(Relaxed)),
                directions,
            },
        }
    }

    /// Ends the flow: a plain close only when nothing is left in flight either way. Bytes lb
    /// took from one side and never delivered to the other are counted as dropped.
    fn close(mut self, end: End) -> Forwarded {
        self.reset_on_drop = match end {
            End::Closed => false,
            End::IdleTimeout(_) => !self.nothing_in_flight(),
            End::Reset(_) => true,
        };
        if self.reset_on_drop {
            self.counters.dropped.inc_by(self.undelivered());
        }
        self.check_not_duplicated();
        Forwarded::Done(
            end,
            Totals {
                kernel: self.ends.iter().map(|e| e.tracked.ctl().redirected()).sum(),
                to_client: self.given_to_peer(Side::Server),
                past_limit: u64::from(self.end(Side::Server).tracked.ctl().past_limit()),
            },
        )
    }

    /// The program must have seen each received byte once: more than TCP received means a
    /// segment was handed to it twice (and forwarded twice). Cheap (one TCP_INFO per socket at
    /// the end, one SIOCINQ at set-up), so every flow is checked.
    fn check_not_duplicated(&self) {
        for from in [Side::Client, Side::Server] {
            let src = self.end(from);
            let Ok(info) = sockopt::tcp_info(src.sock.as_fd()) else {
                continue;
            };
            let seen = src.tracked.ctl().redirected() + src.tracked.ctl().passed();
            let received = info.bytes_received.saturating_sub(src.received_base);
            if seen > received {
                tracing::error!(
                    "kernel flow: the program took {seen} bytes from the {} side, which received {received}",
                    from.name()
                );
                self.counters.duplicated.inc_by(seen - received);
            }
        }
    }

    /// Every byte from each side is queued on the other and acknowledged by its peer.
    fn nothing_in_flight(&self) -> bool {
        [Side::Client, Side::Server].into_iter().all(|from| {
            let src = self.end(from);
            let all_read = src.tracked.ctl().passed() == src.tracked.ctl().consumed();
            matches!(self.end(from.other()).send_state(),
                Ok(s) if all_read && s.queued >= self.given_to_peer(from) && s.unacked == 0)
        })
    }

    /// Bytes lb accepted from either side (redirected, or passed to it) that the other side's
    /// peer has not acknowledged. A dropped side's bytes were never to be delivered.
    fn undelivered(&self) -> u64 {
        [Side::Client, Side::Server]
            .into_iter()
            .filter(|&from| !self.drops(from))
            .map(|from| {
                let ctl = self.end(from).tracked.ctl();
                let taken = ctl.redirected() + ctl.passed();
                let acked = self.end(from.other()).send_state().map_or(0, |s| s.acked);
                taken.saturating_sub(acked)
            })
            .sum()
    }
}

/// What became of a flow handed to the kernel path.
pub enum Forwarded {
    /// Forwarded until it ended.
    Done(End, Totals),
    /// Stopped for an upgrade, to go on in another process (or in this one, if the upgrade
    /// fails): both sockets stay in the maps.
    Moved(Moving),
    /// The kernel would not take the pair: the caller forwards it in userspace, the unsent
    /// bytes first.
    NotEligible(Ineligible, tokio::net::TcpStream, tokio::net::TcpStream, Unsent),
}

/// Why the kernel would not take a pair: the `reason` of `lb_kernel_fallbacks_total`, a fixed
/// small set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ineligible {
    /// A socket was no longer ESTABLISHED: a side had already ended its stream (say a client
    /// that sent its request and half-closed before the server was connected), or was reset.
    /// The SOCKHASH takes only ESTABLISHED sockets: seen before the inserts, or by the kernel
    /// refusing an insert (EOPNOTSUPP) when it happened during the hand-off.
    Ended,
    /// Every control slot was in use.
    NoSlot,
    /// An upgrade was moving the kernel flows to a new process.
    Moving,
    /// The SOCKHASH was full (E2BIG).
    MapFull,
    /// The kernel had no memory for the entry (ENOMEM).
    NoMemory,
    /// A SOCKHASH insert failed otherwise (its errno is in the debug log): EBUSY or EINVAL for
    /// a socket another sockmap program or a ULP (kTLS) already holds. Not expected.
    InsertFailed,
}

impl Ineligible {
    pub fn name(self) -> &'static str {
        match self {
            Ineligible::Ended => "ended",
            Ineligible::NoSlot => "no_slot",
            Ineligible::Moving => "moving",
            Ineligible::MapFull => "map_full",
            Ineligible::NoMemory => "no_memory",
            Ineligible::InsertFailed => "insert_failed",
        }
    }

    /// Why a SOCKHASH insert from userspace failed, from its errno (the kernel's
    /// `sock_map_update_elem_sys` and `sock_hash_update_common`): EOPNOTSUPP for a TCP socket
    /// neither ESTABLISHED nor LISTEN (it got a reset or a FIN since the state check), E2BIG
    /// when the map holds `max_entries`, ENOMEM when an allocation failed.
    fn of_insert(e: &aya::maps::MapError) -> Ineligible {
        let errno = match e {
            aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
            _ => None,
        };
        match errno {
            Some(libc::EOPNOTSUPP) => Ineligible::Ended,
            Some(libc::E2BIG) => Ineligible::MapFull,
            Some(libc::ENOMEM) => Ineligible::NoMemory,
            _ => Ineligible::InsertFailed,
        }
    }
}

/// Why a direction or the flow stopped early.
enum Halt {
    /// The flow ended (a reset or an idle timeout).
    Ended(End),
    /// A socket call failed.
    Failed(io::Error),
    /// A wait inside a direction's copying stopped for a move (the direction adds its state).
    Move,
    /// The direction stopped for a move, in this state.
    Moved(DirectionState),
}

impl From<io::Error> for Halt {
    fn from(e: io::Error) -> Halt {
        Halt::Failed(e)
    }
}

/// The flow handed to [`forward`]: its sockets and how it is forwarded.
pub struct Pair {
    pub client: tokio::net::TcpStream,
    pub server: tokio::net::TcpStream,
    pub timeouts: Timeouts,
    pub directions: Directions,
    /// Bytes the userspace copy loops read and had not written when they stopped: each
    /// direction writes its own first, and only then lets the program redirect.
    pub unsent: Unsent,
}

/// A kernel flow stopped for an upgrade: its sockets (still in the maps, their slots kept)
/// and what the daemon knew of it.
pub struct Moving {
    pub client: TcpStream,
    pub server: TcpStream,
    pub state: MovedState,
}

/// What a process needs to go on forwarding a moved flow (see [`resume`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MovedState {
    /// Client, then server.
    pub ends: [MovedEnd; 2],
    pub timeouts: Timeouts,
    pub dropped: Option<Side>,
    pub discarded: u64,
    pub braked: [bool; 2],
    /// By source side.
    pub directions: [DirectionState; 2],
}

/// One socket of a moved flow.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MovedEnd {
    pub tracked: crate::bpf::Detached,
    pub baseline: u64,
    pub received_base: u64,
}

/// Forwards the flow in the kernel until it ends, or until `moving` is cancelled (an upgrade;
/// then it returns the flow, [`Forwarded::Moved`]). Only failures of socket calls are errors;
/// how the flow ended is the [`End`].
pub async fn forward(
    kernel: &Kernel,
    mut pair: Pair,
    settings: Settings<'_>,
    counters: &FlowCounters<'_>,
    moving: &CancellationToken,
) -> io::Result<Forwarded> {
    let mut unsent = std::mem::take(&mut pair.unsent);
    // Set-up has no await: its locals stay out of the state this future keeps for the flow's
    // whole life.
    let flow = match set_up(kernel, pair, &unsent, settings, counters, moving)? {
        Ok(flow) => flow,
        Err((why, c, s)) => {
            return Ok(Forwarded::NotEligible(
                why,
                tokio::net::TcpStream::from_std(c)?,
                tokio::net::TcpStream::from_std(s)?,
                unsent,
            ))
        }
    };
    let starts = [Side::Client, Side::Server].map(|side| Start::Fresh(unsent.take(side)));
    match run(&flow, starts).await? {
        Ran::Ended(end) => Ok(flow.close(end)),
        Ran::Moved(directions) => Ok(Forwarded::Moved(flow.into_moving(directions))),
    }
}

/// Goes on forwarding a flow that moved (from another process, `adopted`, whose maps this
/// process took over; or back in this one after a move that failed), until it ends or moves
/// again.
pub async fn resume(
    kernel: &Kernel,
    moving: Moving,
    counters: &FlowCounters<'_>,
    token: &CancellationToken,
    adopted: bool,
) -> io::Result<Forwarded> {
    let Moving {
        client,
        server,
        state,
    } = moving;
    let [c, s] = state.ends;
    let cookies = [c.tracked.cookie, s.tracked.cookie];
    // Tracked (or given up) from here on: a move waiting for this one sees it either way.
    struct Resuming<'k>(&'k Kernel);
    impl Drop for Resuming<'_> {
        fn drop(&mut self) {
            self.0.resume_done();
        }
    }
    let resuming = Resuming(kernel);
    // A flow that cannot go on here is reset, not ended with a FIN that would make it look
    // complete, and leaves the maps.
    let reset = |sock: &TcpStream| {
        let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
    };
    let end = |sock: TcpStream, m: MovedEnd| -> Result<FlowSocket<'_>, (io::Error, TcpStream)> {
        let tracked = match kernel.retrack(m.tracked, adopted) {
            Ok(t) => t,
            Err(e) => return Err((io::Error::other(e.to_string()), sock)),
        };
        let watch = match tracked.watch(&sock) {
            Ok(w) => w,
            Err(e) => return Err((e, sock)),
        };
        Ok(FlowSocket {
            sock,
            tracked,
            baseline: m.baseline,
            received_base: m.received_base,
            watch,
        })
    };
    let ends = match (end(client, c), end(server, s)) {
        (Ok(c), Ok(s)) => [c, s],
        (c, s) => {
            let mut error = None;
            for r in [c, s] {
                match r {
                    Ok(end) => {
                        end.watch.forget();
                        reset(&end.sock);
                    }
                    Err((e, sock)) => {
                        reset(&sock);
                        error.get_or_insert(e);
                    }
                }
            }
            for cookie in cookies {
                kernel.remove(cookie);
            }
            return Err(error.unwrap_or_else(|| io::Error::other("resume failed")));
        }
    };
    drop(resuming);
    kernel.flow_started();
    // The bytes redirected before the move were counted by the process that had the flow then
    // (this one, if the upgrade failed): from here on, the new ones.
    let [c, s] = &ends;
    let live = kernel.count_live(
        c.tracked.cookie,
        [c.tracked.ctl().index, s.tracked.ctl().index],
        counters.kernel_bytes.clone(),
        c.tracked.ctl().redirected() + s.tracked.ctl().redirected(),
    );
    if state.braked.iter().any(|&b| b) {
        kernel.set_braked(true);
    }
    let flow = Flow {
        kernel,
        live,
        ends,
        timeouts: state.timeouts,
        counters,
        braked: state.braked.map(AtomicBool::new),
        dropped: state.dropped,
        discarded: AtomicU64::new(state.discarded),
        reset_on_drop: true,
        moving: token,
    };
    let [c2s, s2c] = state.directions;
    match run(&flow, [Start::Resumed(c2s), Start::Resumed(s2c)]).await? {
        Ran::Ended(end) => Ok(flow.close(end)),
        Ran::Moved(directions) => Ok(Forwarded::Moved(flow.into_moving(directions))),
    }
}

/// How [`run`] stopped.
enum Ran {
    Ended(End),
    Moved([DirectionState; 2]),
}

/// Whether the kernel lets a TCP socket use the congestion control `name`
/// (`tune.kernel_congestion`, checked when lb starts).
pub fn check_congestion(name: &str) -> io::Result<()> {
    let probe = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    probe.set_tcp_congestion(name.as_bytes())
}

/// Puts the pair into the maps and kicks it; `Err` gives the sockets back when the kernel would
/// not take them.
#[allow(clippy::type_complexity)]
fn set_up<'k, 'c>(
    kernel: &'k Kernel,
    Pair {
        client,
        server,
        timeouts,
        directions,
        unsent: _,
    }: Pair,
    unsent: &Unsent,
    settings: Settings<'_>,
    counters: &'c FlowCounters<'c>,
    moving: &'c CancellationToken,
) -> io::Result<Result<Flow<'k, 'c>, (Ineligible, TcpStream, TcpStream)>> {
    // Out of tokio's reactor: tokio's registration would wake us for every received batch.
    let (client, server) = (client.into_std()?, server.into_std()?);
    // The state, and the send baseline: bytes given to each socket before the flow enters the
    // map (nothing is written to them from here until the inserts).
    let (c_progress, s_progress) = (
        sockopt::send_progress(client.as_fd())?,
        sockopt::send_progress(server.as_fd())?,
    );
    if c_progress.state != TCP_ESTABLISHED || s_progress.state != TCP_ESTABLISHED {
        return Ok(Err((Ineligible::Ended, client, server)));
    }
    if let Some(bytes) = settings.sndbuf {
        // The kernel's forwarding worker pauses for a tick whenever the destination's send
        // buffer is full: a large fixed buffer keeps it from stalling (tune.kernel_sndbuf).
        for s in [&client, &server] {
            sockopt::force_send_buffer(s.as_fd(), bytes)?;
        }
    }
    let tracked = [(&client, Side::Client), (&server, Side::Server)].map(|(s, side)| {
        // (A socket whose cookie cannot be read stays in userspace, counted as no slot.)
        let cookie = sockopt::cookie(s.as_fd()).map_err(|e| (Ineligible::NoSlot, e.to_string()))?;
        // A direction with unsent bytes is held until the daemon has written them: the
        // program must not redirect newer bytes ahead of them.
        let redirect = directions.dropped() != Some(side) && unsent.of(side).is_empty();
        kernel
            .track(cookie, settings.max_in_flight, redirect)
            .map_err(|e| match e {
                TrackError::Moving => (Ineligible::Moving, e.to_string()),
                TrackError::Full | TrackError::Map(_) => (Ineligible::NoSlot, e.to_string()),
            })
    });
    let (c_tracked, s_tracked) = match tracked {
        [Ok(c), Ok(s)] => (c, s),
        [Err((why, e)), _] | [_, Err((why, e))] => {
            tracing::debug!("flow stays in userspace: {e}");
            return Ok(Err((why, client, server)));
        }
    };
    // Before the inserts: the program sees none of the server's bytes before its limit. (A
    // hand-off always has a byte to go: 0, "none", cannot be meant.)
    if let Some(limit) = directions.limit(Side::Server) {
        s_tracked.ctl().set_limit(limit.max(1));
    }
    let ends = [
        (client, c_tracked, c_progress, unsent.of(Side::Server).len()),
        (server, s_tracked, s_progress, unsent.of(Side::Client).len()),
    ]
    .map(|(sock, tracked, progress, to_write)| {
        let watch = tracked.watch(&sock)?;
        // Bytes waiting unread now go through the program after insertion (the kick).
        let unread = sockopt::inq(sock.as_fd())?;
        Ok::<_, io::Error>(FlowSocket {
            sock,
            tracked,
            // The unsent bytes the daemon writes to this socket first belong before the
            // flow's start in the map too.
            baseline: progress.queued_total + to_write as u64,
            received_base: progress.received_total.saturating_sub(unread),
            watch,
        })
    });
    let [c, s] = ends;
    let (c, s) = (c?, s?);
    if let Err(why) = insert_pair(kernel, &c, &s) {
        // Back to tokio's reactor: out of the kernel flows' epoll set.
        c.watch.forget();
        s.watch.forget();
        return Ok(Err((why, c.sock, s.sock)));
    }
    if let Some(name) = settings.congestion {
        // Once in the map (a flow that stays in userspace keeps the system's). Checked at
        // start: a failure here leaves the socket's own, which still works.
        for (end, side) in [(&c, Side::Client), (&s, Side::Server)] {
            if let Err(e) = socket2::SockRef::from(&end.sock).set_tcp_congestion(name.as_bytes()) {
                tracing::debug!("{} side: congestion control {name} not set: {e}", side.name());
            }
        }
    }
    kernel.flow_started();
    let live = kernel.count_live(
        c.tracked.cookie,
        [c.tracked.ctl().index, s.tracked.ctl().index],
        counters.kernel_bytes.clone(),
        0,
    );
    let flow = Flow {
        kernel,
        live,
        ends: [c, s],
        timeouts,
        counters,
        braked: [AtomicBool::new(false), AtomicBool::new(false)],
        dropped: directions.dropped(),
        discarded: AtomicU64::new(0),
        reset_on_drop: true,
        moving,
    };
    // The kick: bytes that arrived before insertion run through the program.
    for end in &flow.ends {
        sockopt::kick(end.sock.as_fd())?;
    }
    Ok(Ok(flow))
}

/// Both directions until both have passed their end of stream on, one side fails, a side
/// idles out, or both stopped for a move.
async fn run(flow: &Flow<'_, '_>, [c_start, s_start]: [Start; 2]) -> io::Result<Ran> {
    let c2s = direction::run(flow, Side::Client, c_start);
    let s2c = direction::run(flow, Side::Server, s_start);
    tokio::pin!(c2s, s2c);
    // Started (boxed) only once a direction has passed its end of stream on.
    let mut c_after = None;
    let mut s_after = None;
    let mut done = [false, false];
    // A direction stopped for a move, in this state (one done needs none).
    let mut moved: [Option<DirectionState>; 2] = [None, None];
    // Activity only pushes a side's deadline later, so the daemon looks at TCP_INFO only when
    // the earliest possible expiry comes, not after every event.
    let timeouts = flow.timeouts;
    let mut wake = Instant::now() + timeouts.client.min(timeouts.server);
    let halted = loop {
        if done == [true, true] {
            return Ok(Ran::Ended(End::Closed));
        }
        if (0..2).all(|i| done[i] || moved[i].is_some()) && moved.iter().any(Option::is_some) {
            let [c, s] = moved.map(|m| m.unwrap_or(DirectionState::Done));
            return Ok(Ran::Moved([c, s]));
        }
        if Instant::now() >= wake {
            wake = match idle_check(flow)? {
                Ok(deadline) => deadline,
                Err(side) => {
                    flow.log_state("idle timeout");
                    return Ok(Ran::Ended(End::IdleTimeout(side)));
                }
            };
        }
        tokio::select! {
            r = &mut c2s, if !done[0] && moved[0].is_none() => match r {
                Ok(()) => {
                    done[0] = true;
                    c_after = Some(Box::pin(direction::after_end_of_stream(flow, Side::Client)));
                }
                Err(Halt::Moved(state)) => moved[0] = Some(state),
                Err(h) => break h,
            },
            r = &mut s2c, if !done[1] && moved[1].is_none() => match r {
                Ok(()) => {
                    done[1] = true;
                    s_after = Some(Box::pin(direction::after_end_of_stream(flow, Side::Server)));
                }
                Err(Halt::Moved(state)) => moved[1] = Some(state),
                Err(h) => break h,
            },
            h = watch(&mut c_after) => break h,
            h = watch(&mut s_after) => break h,
            _ = tokio::time::sleep_until(wake) => {}
        }
    };
    match halted {
        Halt::Ended(end) => Ok(Ran::Ended(end)),
        Halt::Failed(e) => Err(e),
        // Only directions stop for a move, and they say so with their state.
        Halt::Move | Halt::Moved(_) => Err(io::Error::other("a move stopped the flow itself")),
    }
}

/// Waits on a watcher once it is started; never resolves before.
async fn watch<F: std::future::Future<Output = Halt> + Unpin>(watcher: &mut Option<F>) -> Halt {
    match watcher {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Inserts each socket under its peer's cookie. `Err` says why the kernel refused; the flow
/// is then forwarded in userspace. If only the first insert succeeded, the server socket
/// stays in the map until it closes: its slot is gone with the flow's, so the program passes
/// every byte it receives to its own queue, where userspace reads it; removing it (which would
/// purge that queue) is not needed.
///
/// Bytes a socket receives between the two inserts cannot overtake anything: with its peer not
/// in the map yet, the program holds them (passes them to the socket's queue, counted) and the
/// daemon forwards them before the program may redirect that socket's bytes.
fn insert_pair(kernel: &Kernel, c: &FlowSocket<'_>, s: &FlowSocket<'_>) -> Result<(), Ineligible> {
    // The server's entry goes in first: it attaches the server socket, which in client-first
    // protocols is the one not expected to send in the instant between the two inserts.
    if let Err(e) = kernel.insert(c.tracked.cookie, s.sock.as_raw_fd()) {
        let why = Ineligible::of_insert(&e);
        tracing::debug!(
            "flow stays in userspace ({}): SOCKHASH insert of the server socket failed: {e:#}",
            why.name()
        );
        return Err(why);
    }
    if let Some(gap) = insert_gap_for_tests() {
        std::thread::sleep(gap);
    }
    if let Err(e) = kernel.insert(s.tracked.cookie, c.sock.as_raw_fd()) {
        // The server socket stays in the map until it closes: taking it out would drop the
        // bytes the program already passed to it (they wait in its psock). The program finds
        // no peer for it and passes everything, which the userspace loop reads as usual.
        let why = Ineligible::of_insert(&e);
        tracing::debug!(
            "flow stays in userspace ({}): SOCKHASH insert of the client socket failed: {e:#}",
            why.name()
        );
        return Err(why);
    }
    Ok(())
}

/// Fault injection for the end-to-end tests: `LB_TEST_INSERT_GAP_MS` widens the instant between
/// the two inserts, so bytes that arrive in it (and the hold that keeps them in order) can be
/// tested deterministically. Unset in normal use.
fn insert_gap_for_tests() -> Option<Duration> {
    static GAP: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *GAP.get_or_init(|| {
        let ms: u64 = std::env::var("LB_TEST_INSERT_GAP_MS").ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    })
}

/// Idle detection from TCP_INFO: a side is idle while its socket neither received nor sent new
/// data (`tcpi_last_data_recv`, `tcpi_last_data_sent`); the kernel keeps those clocks, so the
/// daemon only looks when a timeout could have expired.
/// `Ok(when to look again)` or `Err(side that timed out)`.
fn idle_check(flow: &Flow<'_, '_>) -> io::Result<Result<Instant, Side>> {
    let timeouts = flow.timeouts;
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

#[cfg(test)]
mod tests {
    use super::Ineligible;

    fn insert_error(errno: i32) -> aya::maps::MapError {
        aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        }
        .into()
    }

    /// Only a full map is `map_full`: a socket reset or half-closed during the hand-off is
    /// `ended`, as when the state check before the inserts sees it.
    #[test]
    fn a_refused_insert_is_counted_under_what_the_kernel_said() {
        for (errno, reason) in [
            (libc::EOPNOTSUPP, "ended"),
            (libc::E2BIG, "map_full"),
            (libc::ENOMEM, "no_memory"),
            (libc::EBUSY, "insert_failed"),
            (libc::EINVAL, "insert_failed"),
        ] {
            assert_eq!(
                Ineligible::of_insert(&insert_error(errno)).name(),
                reason,
                "errno {errno}"
            );
        }
        let other = aya::maps::MapError::KeyNotFound;
        assert_eq!(Ineligible::of_insert(&other).name(), "insert_failed");
    }
}
