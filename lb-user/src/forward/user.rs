//! Userspace forwarding of one established flow: a copy loop per direction, used when kernel
//! forwarding is unavailable or turned off. Same contract as the kernel path: half-closes are
//! passed on, resets are passed on, idle sides time out.
use prometheus_client::metrics::counter::Counter;
use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::{End, Side, Timeouts, UserBytes};

const BUF: usize = 64 * 1024;

/// Forwards until both directions are closed, one side resets, or one side idles out.
pub async fn forward(
    client: TcpStream,
    server: TcpStream,
    timeouts: Timeouts,
    bytes: &Counter,
) -> (End, UserBytes) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let start = Instant::now();
    let clock = Clock {
        start,
        last: [AtomicU64::new(0), AtomicU64::new(0)],
    };
    let moved = AtomicU64::new(0);
    let end = {
        let c2s = pump(&mut cr, &mut sw, Side::Client, &clock, &moved, bytes);
        let s2c = pump(&mut sr, &mut cw, Side::Server, &clock, &moved, bytes);
        tokio::pin!(c2s, s2c);
        let (mut c2s_done, mut s2c_done) = (false, false);
        loop {
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
        }
    };
    if let End::Reset(_) = end {
        // Pass the reset on: close both with RST rather than FIN. The halves are reunited
        // first because dropping a tokio write half sends a FIN, which the peer would read
        // as a clean end of stream.
        for s in [cr.reunite(cw), sr.reunite(sw)].into_iter().flatten() {
            let _ = s.set_zero_linger();
        }
    }
    (end, UserBytes(moved.load(Relaxed)))
}

/// When each side last moved a byte, as nanoseconds since the flow started (atomics, so the
/// two direction futures can update it while the flow's future stays `Send`).
struct Clock {
    start: Instant,
    last: [AtomicU64; 2],
}

impl Clock {
    fn touch(&self, side: Side) {
        self.last[idx(side)].store(self.start.elapsed().as_nanos() as u64, Relaxed);
    }
    fn last(&self, side: Side) -> Instant {
        self.start + Duration::from_nanos(self.last[idx(side)].load(Relaxed))
    }
}

fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Server => 1,
    }
}

/// Copies one direction until end of stream, then shuts the destination's write side.
/// `Err(side)` names the side that failed.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut R,
    dst: &mut W,
    from: Side,
    clock: &Clock,
    moved: &AtomicU64,
    bytes: &Counter,
) -> Result<(), Side> {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = src.read(&mut buf).await.map_err(|_| from)?;
        clock.touch(from);
        if n == 0 {
            dst.shutdown().await.map_err(|_| from.other())?;
            return Ok(());
        }
        dst.write_all(&buf[..n]).await.map_err(|_| from.other())?;
        clock.touch(from.other());
        moved.fetch_add(n as u64, Relaxed);
        bytes.inc_by(n as u64);
    }
}
