//! A model of one direction's hand-off protocol (../../LIFECYCLE.md), explored over random
//! interleavings: the sender, the program's verdicts, the psock's backlog and redirect
//! workers, the receiver, and the daemon's steps (as `direction.rs` takes them) each move one
//! step at a time in an order drawn at random. Checked in every run: the receiver gets every
//! byte once, in order; and no state is reached where bytes are still to come and nobody can
//! move (both sides waiting on each other).
//!
//! Bytes are numbered in stream order; segments are `(first byte, length)`.
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::collections::VecDeque;

/// Segments as a FIFO with byte counts, for a socket's queues.
#[derive(Default, Clone)]
struct Segments {
    q: VecDeque<(u64, u64)>,
    bytes: u64,
}

impl Segments {
    fn push(&mut self, seg: (u64, u64)) {
        self.bytes += seg.1;
        self.q.push_back(seg);
    }

    /// Takes `n` bytes off the front (the caller checked they are there).
    fn take(&mut self, mut n: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while n > 0 {
            let (start, len) = self.q.pop_front().expect("bytes to take");
            let k = len.min(n);
            out.push((start, k));
            if k < len {
                self.q.push_front((start + k, len - k));
            }
            n -= k;
            self.bytes -= k;
        }
        out
    }

    /// What the segments are charged to the receive buffer: their bytes and an overhead per
    /// segment (the kernel charges an skb's true size).
    fn charge(&self) -> u64 {
        self.bytes + OVERHEAD * self.q.len() as u64
    }

    /// The segments of bytes `from..to` counted from the front, without taking them.
    fn peek(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let (mut at, mut out) = (0, Vec::new());
        for &(start, len) in &self.q {
            let (lo, hi) = (from.max(at), to.min(at + len));
            if lo < hi {
                out.push((start + lo - at, hi - lo));
            }
            at += len;
        }
        out
    }
}

/// The daemon's bugs the exploration must find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    /// It keeps written bytes queued until it has caught up.
    KeepsWritten,
    /// It writes held bytes while redirected ones are still in the peer's psock queue.
    WritesEarly,
}

/// Receive-buffer overhead of one queued segment.
const OVERHEAD: u64 = 2;

/// The parameters of one run.
#[derive(Debug, Clone, Copy)]
struct Params {
    total: u64,
    segment: u64,
    rcvbuf: u64,
    sndbuf: u64,
    max_in_flight: u64,
    /// Bytes the userspace copy loop had not written when the flow entered the map.
    unsent: u64,
}

#[derive(Default)]
struct Model {
    p: Option<Params>,
    // The sender: the next byte it sends (after the unsent ones).
    next: u64,
    // The source socket: passed segments in the psock's backlog, then in its queue (charged to
    // the receive buffer; the queue's front holds the written-not-dequeued bytes).
    backlog: Segments,
    queue: Segments,
    rcvbuf: u64,
    // The program's fields.
    redirecting: bool,
    passed: u64,
    redirected: u64,
    // The daemon's published fields.
    consumed: u64,
    allow: bool,
    // The daemon's own state.
    unsent_written: bool,
    dequeued: u64,
    released: bool,
    /// Written to the peer, not yet published as consumed.
    unpublished: u64,
    /// A broken daemon, to show the exploration finds what it is for.
    broken: Option<Broken>,
    // The peer: redirected segments in its psock queue, then its send queue; the receiver.
    psock: Segments,
    send_queue: u64,
    acked: u64,
    delivered: Vec<(u64, u64)>,
}

impl Model {
    fn params(&self) -> Params {
        self.p.expect("params")
    }

    /// Bytes given to the peer that its receiver has not acknowledged.
    fn lag(&self) -> u64 {
        self.redirected + self.consumed + self.params().unsent - self.acked
    }

    fn deliver(&mut self, segs: Vec<(u64, u64)>) {
        for (start, len) in segs {
            self.send_queue += len;
            match self.delivered.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => self.delivered.push((start, len)),
            }
        }
    }

    /// The sender sends a segment if TCP's window allows (held bytes fill the receive buffer),
    /// and the program's verdict runs on it.
    fn sender(&mut self) -> bool {
        let p = self.params();
        let held = self.backlog.bytes + self.queue.bytes;
        if self.next >= p.total || held + p.segment > self.rcvbuf {
            return false;
        }
        let seg = (self.next, p.segment.min(p.total - self.next));
        self.next += seg.1;
        let redirect = if self.redirecting {
            let braked = self.lag() + seg.1 > p.max_in_flight;
            !braked
        } else {
            self.allow && self.passed == self.consumed
        };
        self.redirecting = redirect;
        if redirect {
            self.redirected += seg.1;
            self.psock.push(seg);
        } else {
            self.passed += seg.1;
            self.backlog.push(seg);
        }
        true
    }

    /// The backlog worker queues a passed segment while the receive memory allows.
    fn backlog_worker(&mut self) -> bool {
        if self.backlog.q.is_empty() || self.queue.charge() > self.rcvbuf {
            return false;
        }
        let len = self.backlog.q[0].1;
        for seg in self.backlog.take(len) {
            self.queue.push(seg);
        }
        true
    }

    /// The redirect worker moves a segment into the peer's send queue while it has room.
    fn redirect_worker(&mut self) -> bool {
        let Some(&(_, len)) = self.psock.q.front() else {
            return false;
        };
        if self.send_queue + len > self.params().sndbuf {
            return false;
        }
        let segs = self.psock.take(len);
        self.deliver(segs);
        true
    }

    /// The receiver reads (and acknowledges) some of what was sent.
    fn receiver(&mut self, rng: &mut SmallRng) -> bool {
        if self.send_queue == 0 {
            return false;
        }
        let n = rng.gen_range(1..=self.send_queue);
        self.send_queue -= n;
        self.acked += n;
        true
    }

    /// The throttle: the daemon shrinks or gives back the source's receive buffer.
    fn throttle(&mut self, rng: &mut SmallRng) -> bool {
        let full = self.params().rcvbuf;
        let new = match self.rcvbuf == full {
            true => rng.gen_range(1..=(full / 4).max(1)),
            false => full,
        };
        self.rcvbuf = new;
        true
    }

    /// One step of the daemon's copy of a held direction, as `direction::pump` takes them.
    fn daemon(&mut self) -> bool {
        let p = self.params();
        if !self.unsent_written {
            // The unsent bytes go first, then the program may redirect.
            let room = p.sndbuf.saturating_sub(self.send_queue);
            if room < p.unsent {
                return false;
            }
            self.deliver(vec![(0, p.unsent)]);
            self.unsent_written = true;
            self.allow = true;
            return true;
        }
        if self.unpublished > 0 {
            self.consumed += self.unpublished;
            self.unpublished = 0;
            return true;
        }
        if self.passed == self.consumed {
            // Caught up: the written bytes come off the socket.
            self.released = false;
            if self.dequeued < self.consumed {
                self.queue.take(self.consumed - self.dequeued);
                self.dequeued = self.consumed;
                return true;
            }
            return false;
        }
        let low = if self.released || self.redirected == 0 {
            p.max_in_flight.saturating_sub(p.max_in_flight / 8)
        } else {
            p.max_in_flight / 4
        };
        // Every redirected byte must be in the peer's send queue before a held one is
        // written behind it, and the receiver must have drained to the mark.
        let early = self.broken == Some(Broken::WritesEarly);
        if (!self.psock.q.is_empty() && !early) || self.lag() > low {
            return false;
        }
        self.released = true;
        let room = p.max_in_flight - self.lag();
        let skip = self.consumed - self.dequeued;
        let want = (self.passed - self.dequeued).min(skip + room);
        let n = want.min(self.queue.bytes);
        if n <= skip {
            // Nothing new queued yet: the written bytes come off, making room for the rest.
            if skip == 0 || self.broken == Some(Broken::KeepsWritten) {
                return false;
            }
            self.queue.take(skip);
            self.dequeued += skip;
            return true;
        }
        let n = n.min(skip + p.sndbuf.saturating_sub(self.send_queue));
        if n <= skip {
            return false;
        }
        let segs = self.queue.peek(skip, n);
        self.deliver(segs);
        self.unpublished = n - skip;
        true
    }

    fn done(&self) -> bool {
        self.acked == self.params().total
    }
}

/// One run: actors drawn at random until every byte is acknowledged. Panics on a reordered,
/// lost or repeated byte, and on a state where bytes remain and no actor can move.
fn run(p: Params, seed: u64, broken: Option<Broken>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut m = Model {
        p: Some(p),
        broken,
        next: p.unsent,
        rcvbuf: p.rcvbuf,
        unsent_written: p.unsent == 0,
        allow: p.unsent == 0,
        ..Model::default()
    };
    for step in 0..1_000_000u64 {
        if m.done() {
            break;
        }
        // Actors in a random order; the first that can move does. The throttle moves rarely.
        let mut order = [0u8, 1, 2, 3, 4, 5];
        for i in (1..order.len()).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        let moved = order.iter().any(|&a| match a {
            0 => m.sender(),
            1 => m.backlog_worker(),
            2 => m.redirect_worker(),
            3 => m.receiver(&mut rng),
            4 => m.daemon(),
            _ => rng.gen_ratio(1, 50) && m.throttle(&mut rng),
        });
        if !moved && !m.throttle_would_unstick() {
            panic!(
                "{p:?} seed {seed}: stuck at step {step}: sent {} passed {} consumed {} dequeued {} redirected {} acked {} queue {} backlog {} psock {} rcvbuf {}",
                m.next, m.passed, m.consumed, m.dequeued, m.redirected, m.acked, m.queue.bytes, m.backlog.bytes, m.psock.bytes, m.rcvbuf
            );
        }
    }
    assert!(m.done(), "{p:?} seed {seed}: not done after the step bound");
    assert_eq!(
        m.delivered,
        vec![(0, p.total)],
        "{p:?} seed {seed}: delivered out of order"
    );
}

impl Model {
    /// A shrunk buffer is always given back eventually (the throttle ends): a state stuck
    /// only by it is not a deadlock.
    fn throttle_would_unstick(&mut self) -> bool {
        if self.rcvbuf == self.params().rcvbuf {
            return false;
        }
        self.rcvbuf = self.params().rcvbuf;
        true
    }
}

fn explore(broken: Option<Broken>) {
    let mut rng = SmallRng::seed_from_u64(1);
    for seed in 0..3000u64 {
        let segment = rng.gen_range(1..=8);
        let unsent = rng.gen_range(0..=4);
        let p = Params {
            total: unsent + rng.gen_range(1..400),
            segment,
            rcvbuf: rng.gen_range(segment + OVERHEAD..=8 * segment),
            sndbuf: rng.gen_range(8..64),
            max_in_flight: rng.gen_range(8..96),
            unsent,
        };
        run(p, seed, broken);
    }
}

#[test]
fn every_byte_once_in_order_and_never_stuck() {
    explore(None);
}

#[test]
#[should_panic(expected = "stuck")]
fn the_exploration_finds_written_bytes_left_queued() {
    explore(Some(Broken::KeepsWritten));
}

#[test]
#[should_panic(expected = "out of order")]
fn the_exploration_finds_held_bytes_written_too_early() {
    explore(Some(Broken::WritesEarly));
}
