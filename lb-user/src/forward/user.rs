//! Userspace forwarding of one established flow: a copy loop per direction, used when kernel
//! forwarding is unavailable or turned off, or for a flow the kernel would not take. Same
//! contract as the kernel path: half-closes are passed on, resets are passed on, idle sides
//! time out, and a flow that does not end cleanly is closed with a reset.
use prometheus_client::metrics::counter::Counter;
use std::{
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::{End, Side, Timeouts};

/// First buffer per direction; it grows to [`MAX_BUF`] when reads fill it (bulk flows).
const FIRST_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 64 * 1024;

/// Forwards until both directions are closed, one side resets, or one side idles out.
pub async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    timeouts: Timeouts,
    bytes: &Counter,
) -> End {
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
    let writing = [AtomicBool::new(false), AtomicBool::new(false)];
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let c2s = pump(&mut cr, &mut sw, Side::Client, &clock, &writing, bytes);
    let s2c = pump(&mut sr, &mut cw, Side::Server, &clock, &writing, bytes);
    tokio::pin!(c2s, s2c);
    let (mut c2s_done, mut s2c_done) = (false, false);
    let end = loop {
        if c2s_done && s2c_done {
            break End::Closed;
        }
        let deadline = [Side::Client, Side::Server]
            .iter()
            .map(|&s| clock.last(s) + timeouts.of(s))
            .min()
            .unwrap_or(start);
        tokio::select! {
            r = &mut c2s, if !c2s_done => match r {
                Ok(()) => c2s_done = true,
                Err(side) => break End::Reset(side),
            },
            r = &mut s2c, if !s2c_done => match r {
                Ok(()) => s2c_done = true,
                Err(side) => break End::Reset(side),
            },
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if let Some(side) = [Side::Client, Side::Server]
                    .into_iter()
                    .find(|&s| now.duration_since(clock.last(s)) >= timeouts.of(s))
                {
                    break End::IdleTimeout(side);
                }
            }
        }
    };
    // A plain close only when the streams are complete: after both ends of stream, or on an
    // idle flow with no write pending.
    guard.armed = match end {
        End::Closed => false,
        End::IdleTimeout(_) => writing.iter().any(|w| w.load(Relaxed)),
        End::Reset(_) => true,
    };
    end
}

/// Sets SO_LINGER 0 on both sockets when dropped armed, so closing them sends a reset.
struct ResetOnDrop {
    fds: [RawFd; 2],
    armed: bool,
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
struct Clock {
    start: Instant,
    last: [AtomicU64; 2],
}

impl Clock {
    fn touch(&self, side: Side) {
        self.last[side.index()].store(self.start.elapsed().as_nanos() as u64, Relaxed);
    }
    fn last(&self, side: Side) -> Instant {
        self.start + Duration::from_nanos(self.last[side.index()].load(Relaxed))
    }
}

/// Copies one direction until end of stream, then shuts the destination's write side.
/// `Err(side)` names the side that failed.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut R,
    dst: &mut W,
    from: Side,
    clock: &Clock,
    writing: &[AtomicBool; 2],
    bytes: &Counter,
) -> Result<(), Side> {
    let mut buf = vec![0u8; FIRST_BUF];
    loop {
        let n = src.read(&mut buf).await.map_err(|_| from)?;
        clock.touch(from);
        if n == 0 {
            dst.shutdown().await.map_err(|_| from.other())?;
            return Ok(());
        }
        writing[from.index()].store(true, Relaxed);
        dst.write_all(&buf[..n]).await.map_err(|_| from.other())?;
        writing[from.index()].store(false, Relaxed);
        clock.touch(from.other());
        bytes.inc_by(n as u64);
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(MAX_BUF, 0);
        }
    }
}
