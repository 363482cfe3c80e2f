//! Moving HTTP messages between the two connections of a session: reading into a side's held
//! buffer under a deadline, writing under an idle limit, and forwarding a body as its framing
//! delimits it (the bytes after it stay held: they are the next pipelined message).
use std::{borrow::Cow, io, os::fd::AsFd, pin::Pin, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    time::{Instant, Sleep},
};

use crate::stream::Stream;

use super::{
    chunked::{ChunkError, Chunked},
    framing::Body,
};

/// Most bytes read at once, and what a connection's buffer starts with (a head fits).
const READ_MAX: usize = 64 << 10;
const READ_FIRST: usize = 4 << 10;
/// A buffer grown past this for a body is given back while its connection idles.
const KEEP_WHILE_IDLE: usize = 16 << 10;

/// One side's connection and the bytes read from it that were not consumed yet.
pub struct Conn {
    pub stream: Stream,
    pub held: Vec<u8>,
    /// Room to make before the next read: doubles (to [`READ_MAX`]) each time a read fills it.
    want: usize,
    /// The read deadline's timer, armed lazily (see [`Conn::fill`]).
    timer: Pin<Box<Sleep>>,
}

/// A deadline no read waits for: where a new connection's timer starts.
const UNARMED: Duration = Duration::from_secs(365 * 24 * 3600);

impl Conn {
    pub fn new(stream: impl Into<Stream>) -> Conn {
        Conn {
            stream: stream.into(),
            held: Vec::new(),
            want: READ_FIRST,
            timer: Box::pin(tokio::time::sleep(UNARMED)),
        }
    }

    /// Reads more bytes into `held`; `Ok(0)` at end of stream (see [`Source::fill`]).
    pub async fn fill(&mut self, deadline: Instant) -> Result<usize, ReadError> {
        self.source().fill(deadline).await
    }

    /// Its reading side, over the whole stream.
    pub fn source(&mut self) -> Source<'_, &mut Stream> {
        Source {
            io: &mut self.stream,
            held: &mut self.held,
            want: &mut self.want,
            timer: self.timer.as_mut(),
        }
    }

    /// Its reading side and its writing half, to read and write at once (a request body going
    /// one way while the response comes the other). Both halves are polled by one task, so
    /// the lock between them is never contended.
    pub fn split(&mut self) -> (Source<'_, ReadHalf<&mut Stream>>, WriteHalf<&mut Stream>) {
        let (read, write) = tokio::io::split(&mut self.stream);
        let source = Source {
            io: read,
            held: &mut self.held,
            want: &mut self.want,
            timer: self.timer.as_mut(),
        };
        (source, write)
    }

    /// Drops the first `n` held bytes (a head or body part that was consumed).
    pub fn consume(&mut self, n: usize) {
        self.held.drain(..n);
    }

    /// Whether the peer sent bytes lb has not taken yet: held here, inside the TLS layer, or
    /// still in the socket. A close with unread input sends the peer a reset, which can
    /// destroy the answers it was still to read.
    pub fn has_input(&mut self) -> bool {
        !self.held.is_empty()
            || self.stream.tls_holds_input()
            || matches!(crate::sockopt::peek_nowait(self.stream.as_fd(), &mut [0u8; 1]), Ok(n) if n > 0)
    }

    /// Before a wait that may be long (keep-alive): a buffer a body grew is given back, so an
    /// idle connection holds little memory.
    pub fn shrink_if_idle(&mut self) {
        if self.held.is_empty() && self.held.capacity() > KEEP_WHILE_IDLE {
            self.held = Vec::new();
            self.want = READ_FIRST;
        }
    }
}

/// The reading side of a [`Conn`]: its stream (or the stream's read half) with the bytes held
/// from it and its read timer.
pub struct Source<'a, R> {
    io: R,
    pub held: &'a mut Vec<u8>,
    want: &'a mut usize,
    timer: Pin<&'a mut Sleep>,
}

impl<R: AsyncRead + Unpin> Source<'_, R> {
    /// Reads more bytes into `held`; `Ok(0)` at end of stream.
    ///
    /// The timer is moved only when it must fire sooner than it is set to; when it fires before
    /// `deadline` (set for an earlier read), it is set again. So a kept-alive connection moves its
    /// timer about once per timeout period instead of once per read, and never arms one sooner
    /// than all others at every request: tokio then wakes its poller with a syscall (measured:
    /// 0.19 eventfd writes per request with a 10 s keep-alive wait after a 60 s server wait).
    pub async fn fill(&mut self, deadline: Instant) -> Result<usize, ReadError> {
        self.held.reserve(*self.want);
        let room = self.held.capacity() - self.held.len();
        let Source { io, held, timer, .. } = self;
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        let read = io.read_buf(*held);
        tokio::pin!(read);
        let n = loop {
            tokio::select! {
                biased;
                // A TLS peer that closed without a close_notify is an error (UnexpectedEof):
                // whatever it was sending may have been cut by someone on the path.
                r = &mut read => break r.map_err(ReadError::Io)?,
                () = timer.as_mut() => {
                    if Instant::now() >= deadline {
                        return Err(ReadError::Timeout);
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        };
        if n == room {
            *self.want = (*self.want * 2).min(READ_MAX);
        }
        Ok(n)
    }

    /// Drops the first `n` held bytes (a head or body part that was consumed).
    pub fn consume(&mut self, n: usize) {
        self.held.drain(..n);
    }
}

/// Why a read failed.
#[derive(Debug)]
pub enum ReadError {
    Timeout,
    Io(io::Error),
}

/// Writes all of `bytes`, each write allowed `idle`, and flushes (a TLS stream may hold the
/// last record back otherwise).
pub async fn write_all<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    idle: Duration,
) -> io::Result<()> {
    let written = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(idle, written).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Why a body could not be forwarded, by side.
#[derive(Debug)]
pub enum BodyError {
    /// The sender closed, failed or stalled for its idle limit before the body's end.
    Source(io::Error),
    /// The receiver failed or stalled.
    Destination(io::Error),
    /// A malformed chunked body (what went before the fault is the body up to its last whole
    /// size line: see [`Chunked::withheld`]).
    Malformed(ChunkError),
    /// The body grew past `limits.max_body_bytes`.
    TooLarge,
}

/// How far [`forward_message`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The whole message; how many body bytes.
    Whole(u64),
    /// The head and this many body bytes (at least `hand_off_after`), the rest of the body not
    /// yet: the caller hands it to the kernel. Nothing is left held (it stops only once every
    /// byte it read went: a body ending within them would have been whole).
    HandOff(u64),
}

/// Where [`forward_message`] may stop before a body's end.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bounds {
    /// The largest body accepted ([`BodyError::TooLarge`] past it).
    pub max: Option<u64>,
    /// Stop once that many body bytes went and the body is not over ([`Moved::HandOff`]).
    pub hand_off_after: Option<u64>,
}

/// What [`forward_message`] wrote so far, whether it ended well or not: what the access log
/// and the byte counters show, and whether the receiver saw anything of the message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// A write began: from then on the receiver may have part of the message, and nothing
    /// else may be sent to it in its place.
    pub started: bool,
    /// The head went.
    pub head: bool,
    /// Body bytes that went (framing included, as they came).
    pub body: u64,
}

/// Sends `head`, then the body delimited by `body` from `src` (its held bytes first) to `dst`:
/// the head and the body bytes already held leave in one write (one segment for a small
/// message); when none is held, the head goes alone at once (a borrowed head is then never
/// copied). Each read is allowed `src_idle`, each write `dst_idle`; `bounds`: where it may stop
/// before the body's end. `progress` tells what went, also when it fails. A chunked body's last chunk and trailers go
/// only once whole and checked ([`Chunked::withheld`]).
pub async fn forward_message<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut Source<'_, R>,
    dst: &mut W,
    mut head: Cow<'_, [u8]>,
    body: Body,
    (src_idle, dst_idle): (Duration, Duration),
    Bounds { max, hand_off_after }: Bounds,
    progress: &mut Progress,
) -> Result<Moved, BodyError> {
    *progress = Progress::default();
    let mut chunked = Chunked::default();
    // Held bytes the chunked checker saw but that may not go yet (at the front of `held`).
    let mut withheld = 0;
    let mut left = match body {
        Body::None => 0,
        Body::Length(n) => n,
        Body::Chunked | Body::UntilClose => u64::MAX,
    };
    loop {
        if left == 0 || src.held.is_empty() {
            // Nothing of the body to go with the head (none, or none here yet): it goes alone.
            if !head.is_empty() {
                progress.started = true;
                write_all(dst, &head, dst_idle)
                    .await
                    .map_err(BodyError::Destination)?;
                head = Cow::Borrowed(&[]);
            }
            progress.head = true;
            if left == 0 {
                return Ok(Moved::Whole(progress.body));
            }
        } else {
            let take = match body {
                Body::Chunked => {
                    let n = chunked
                        .feed(&src.held[withheld..])
                        .map_err(BodyError::Malformed)?;
                    if max.is_some_and(|m| chunked.data_bytes() > m) {
                        return Err(BodyError::TooLarge);
                    }
                    let seen = withheld + n;
                    withheld = chunked.withheld();
                    seen - withheld
                }
                _ => src.held.len().min(usize::try_from(left).unwrap_or(usize::MAX)),
            };
            let out = if head.is_empty() {
                &src.held[..take]
            } else {
                head.to_mut().extend_from_slice(&src.held[..take]);
                &head[..]
            };
            if !out.is_empty() {
                progress.started = true;
                write_all(dst, out, dst_idle)
                    .await
                    .map_err(BodyError::Destination)?;
            }
            head = Cow::Borrowed(&[]);
            progress.head = true;
            src.consume(take);
            progress.body += take as u64;
            if body != Body::UntilClose {
                left -= take as u64;
            }
            if left == 0 || chunked.done() {
                return Ok(Moved::Whole(progress.body));
            }
        }
        // Only with nothing held back: the kernel would forward past it.
        if withheld == 0 && hand_off_after.is_some_and(|after| progress.body >= after) {
            return Ok(Moved::HandOff(progress.body));
        }
        match src.fill(Instant::now() + src_idle).await {
            Ok(0) if body == Body::UntilClose => return Ok(Moved::Whole(progress.body)),
            Ok(0) => return Err(BodyError::Source(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(ReadError::Timeout) => return Err(BodyError::Source(io::ErrorKind::TimedOut.into())),
            Err(ReadError::Io(e)) => return Err(BodyError::Source(e)),
        }
    }
}

/// Cuts a connection whose message was sent only in part: closing it sends a reset, never a
/// FIN, so the peer cannot take what it got for a whole message (a body read until the close,
/// or a chunked body that lacks only its final CRLF).
pub fn cut(stream: Stream) {
    let _ = stream.tcp().set_zero_linger();
    drop(stream);
}

/// Ends a connection lb answered and will not read from again: its write side is shut, then
/// what the peer still sends is read and dropped (for at most `linger`), so that closing does
/// not reset the connection before the peer has read the answer (a close with unread input
/// sends RST, which can destroy data the peer has not read yet).
pub async fn close_gently(mut stream: Stream, linger: Duration) {
    let _ = stream.shutdown().await;
    let deadline = Instant::now() + linger;
    let mut sink = [0u8; 4096];
    // Bounded: at most 256 reads, and the deadline.
    for _ in 0..256 {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => continue,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::loopback_pair as pair;

    /// Sends `input` into a Conn whose first `held` bytes are already held, forwards a 4-byte
    /// head and `body`, and returns what reached the other side after the head and what stayed
    /// held.
    async fn run(
        input: &[u8],
        held: usize,
        body: Body,
        max: Option<u64>,
    ) -> (Result<u64, BodyError>, Vec<u8>, Vec<u8>) {
        let (r, got, rest) = run_until(input, held, body, max, None).await;
        let r = r.map(|m| match m {
            Moved::Whole(n) => n,
            Moved::HandOff(n) => panic!("handed off after {n} bytes without a budget"),
        });
        (r, got, rest)
    }

    /// [`run`] with a hand-off budget.
    async fn run_until(
        input: &[u8],
        held: usize,
        body: Body,
        max: Option<u64>,
        hand_off_after: Option<u64>,
    ) -> (Result<Moved, BodyError>, Vec<u8>, Vec<u8>) {
        let (mut writer, reader) = pair().await;
        let (mut dst, mut out) = pair().await;
        let mut src = Conn::new(reader);
        src.held.extend_from_slice(&input[..held]);
        writer.write_all(&input[held..]).await.unwrap();
        drop(writer);
        let idle = Duration::from_secs(5);
        let mut progress = Progress::default();
        let r = forward_message(
            &mut src.source(),
            &mut dst,
            Cow::Borrowed(&b"HEAD"[..]),
            body,
            (idle, idle),
            Bounds { max, hand_off_after },
            &mut progress,
        )
        .await;
        drop(dst);
        let mut got = Vec::new();
        out.read_to_end(&mut got).await.unwrap();
        if !progress.head {
            assert!(got.is_empty(), "bytes went without the head");
            return (r, got, src.held);
        }
        assert!(got.starts_with(b"HEAD"), "the head did not go first");
        got.drain(..4);
        assert_eq!(progress.body, got.len() as u64, "progress counts what went");
        (r, got, src.held)
    }

    /// Paused time: each wait below ends at a timer's deadline, exactly (to tokio's millisecond).
    fn near(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_millis(2)
    }

    #[tokio::test(start_paused = true)]
    async fn each_read_times_out_at_its_own_deadline_wherever_the_lazy_timer_was() {
        let (mut writer, reader) = pair().await;
        let mut c = Conn::new(reader);
        let t0 = Instant::now();
        // Answered after 1 s, under a 10 s deadline: the timer stays set to t0 + 10 s.
        let w = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            writer.write_all(b"a").await.unwrap();
            writer
        });
        assert_eq!(c.fill(t0 + Duration::from_secs(10)).await.unwrap(), 1);
        let mut writer = w.await.unwrap();
        // A later deadline: the timer fires first, at t0 + 10 s, and is set again; a byte
        // arriving after that, before the deadline, is read, not reported as a timeout.
        let w = tokio::spawn(async move {
            tokio::time::sleep_until(t0 + Duration::from_millis(10_500)).await;
            writer.write_all(b"b").await.unwrap();
            writer
        });
        assert_eq!(c.fill(t0 + Duration::from_secs(11)).await.unwrap(), 1);
        assert!(
            near(t0.elapsed(), Duration::from_millis(10_500)),
            "{:?}",
            t0.elapsed()
        );
        let _writer = w.await.unwrap();
        // Nothing more comes: the read fails at its deadline, past the timer's last setting...
        let t1 = Instant::now();
        let r = c.fill(t1 + Duration::from_secs(30)).await;
        assert!(matches!(r, Err(ReadError::Timeout)));
        assert!(near(t1.elapsed(), Duration::from_secs(30)), "{:?}", t1.elapsed());
        // ...and at a deadline sooner than the timer's setting too.
        c.timer.as_mut().reset(Instant::now() + Duration::from_secs(60));
        let t2 = Instant::now();
        let r = c.fill(t2 + Duration::from_secs(5)).await;
        assert!(matches!(r, Err(ReadError::Timeout)));
        assert!(near(t2.elapsed(), Duration::from_secs(5)), "{:?}", t2.elapsed());
    }

    #[tokio::test]
    async fn a_length_body_stops_at_its_length() {
        // Everything held at once: the bytes after the body must stay held, exactly.
        let input = b"hello worldGET /";
        let (r, got, rest) = run(input, input.len(), Body::Length(11), None).await;
        assert_eq!(r.unwrap(), 11);
        assert_eq!(got, b"hello world");
        assert_eq!(rest, b"GET /");
        // Part held, part still in the socket: the body is complete all the same.
        let (r, got, _) = run(input, 3, Body::Length(11), None).await;
        assert_eq!((r.unwrap(), got.as_slice()), (11, &b"hello world"[..]));
    }

    #[tokio::test]
    async fn an_empty_body_does_not_wait_for_bytes() {
        let (mut _writer, reader) = pair().await;
        let (mut dst, _out) = pair().await;
        let mut src = Conn::new(reader);
        let idle = Duration::from_secs(30);
        let mut progress = Progress::default();
        let mut source = src.source();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            forward_message(
                &mut source,
                &mut dst,
                Cow::Borrowed(&[]),
                Body::Length(0),
                (idle, idle),
                Bounds {
                    max: None,
                    hand_off_after: Some(0),
                },
                &mut progress,
            ),
        );
        assert_eq!(
            r.await.expect("waited for a byte of an empty body").unwrap(),
            Moved::Whole(0)
        );
    }

    #[tokio::test]
    async fn a_chunked_body_is_forwarded_as_it_came() {
        let body = b"5\r\nhello\r\n0\r\nX: y\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"NEXT");
        let (r, got, rest) = run(&input, input.len(), Body::Chunked, None).await;
        assert_eq!(r.unwrap(), body.len() as u64);
        assert_eq!(got, body);
        assert_eq!(rest, b"NEXT");
        let (r, _, _) = run(body, 0, Body::Chunked, Some(4)).await;
        assert!(matches!(r, Err(BodyError::TooLarge)));
        let (r, got, _) = run(b"5\r\nhello\r\nzz\r\n", 0, Body::Chunked, None).await;
        assert!(matches!(r, Err(BodyError::Malformed(_))));
        // Nothing past the fault reaches the receiver.
        assert!(b"5\r\nhello\r\n".starts_with(&got));
    }

    #[tokio::test]
    async fn a_chunked_body_cut_before_its_end_never_shows_its_last_chunk() {
        // Malformed or oversized trailers, or a close within them: the last chunk stays back.
        let long = format!("0\r\nX: {}\r\n\r\n", "y".repeat(20_000));
        for (input, held) in [
            (&b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n"[..], 0),
            (b"5\r\nhello\r\n0\r\nX: y\r\n", 0),
            (b"5\r\nhello\r\n0\r\n", 13),
            (long.as_bytes(), 0),
        ] {
            let (r, got, _) = run(input, held, Body::Chunked, None).await;
            assert!(r.is_err(), "{:?}", String::from_utf8_lossy(input));
            assert!(
                b"5\r\nhello\r\n".starts_with(&got),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
        }
        // A bad first size held with the head: nothing goes, the head included.
        let (r, got, _) = run(b"zz\r\n", 4, Body::Chunked, None).await;
        assert!(matches!(r, Err(BodyError::Malformed(_))));
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn a_body_cut_short_is_the_senders_fault() {
        let (r, _, _) = run(b"abc", 0, Body::Length(10), None).await;
        assert!(matches!(r, Err(BodyError::Source(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
        let (r, got, _) = run(b"until the end", 5, Body::UntilClose, None).await;
        assert_eq!((r.unwrap(), got.as_slice()), (13, &b"until the end"[..]));
    }

    #[tokio::test]
    async fn a_body_is_handed_off_after_its_budget_unless_it_ends_first() {
        // A budget of 0: the head goes, and the body is left to the caller at once.
        let (r, got, rest) = run_until(b"0123456789", 0, Body::Length(10), None, Some(0)).await;
        assert_eq!((r.unwrap(), got.len(), rest.len()), (Moved::HandOff(0), 0, 0));
        // Held bytes at or past the budget go with the head, the rest is left.
        let (r, got, _) = run_until(b"0123456789", 4, Body::Length(10), None, Some(3)).await;
        assert_eq!((r.unwrap(), got.as_slice()), (Moved::HandOff(4), &b"0123"[..]));
        // A body that ends within the budget is whole, and the bytes after it stay held.
        let (r, got, rest) = run_until(b"0123456789NEXT", 14, Body::Length(10), None, Some(10)).await;
        assert_eq!(r.unwrap(), Moved::Whole(10));
        assert_eq!(
            (got.as_slice(), rest.as_slice()),
            (&b"0123456789"[..], &b"NEXT"[..])
        );
        let chunked = b"3\r\nabc\r\n0\r\n\r\n";
        let (r, _, _) = run_until(chunked, chunked.len(), Body::Chunked, None, Some(3)).await;
        assert_eq!(r.unwrap(), Moved::Whole(chunked.len() as u64));
        // A chunked body is handed off between reads once past the budget.
        let (r, got, _) = run_until(chunked, 5, Body::Chunked, None, Some(1)).await;
        assert!(
            matches!(r.unwrap(), Moved::HandOff(n) if (1..=5).contains(&n)),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn input_counts_whether_held_or_still_in_the_socket() {
        let (mut writer, reader) = pair().await;
        let mut c = Conn::new(reader);
        assert!(!c.has_input());
        writer.write_all(b"GET").await.unwrap();
        c.stream.tcp().readable().await.unwrap();
        assert!(c.has_input(), "unread bytes in the socket");
        let n = c.fill(Instant::now() + Duration::from_secs(5)).await.unwrap();
        assert_eq!(n, 3);
        assert!(c.has_input(), "held bytes");
        c.consume(3);
        assert!(!c.has_input());
        // A peer's close is no input: closing then resets nothing.
        drop(writer);
        c.stream.tcp().readable().await.unwrap();
        assert!(!c.has_input());
    }
}
