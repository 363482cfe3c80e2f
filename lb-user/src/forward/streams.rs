//! The forwarding stage for a flow with a TLS side: without kTLS the kernel cannot read or
//! write TLS records, so lb copies (decrypting on one side, encrypting on the other) until the
//! flow ends, under the same contract as the other two paths: end of stream passed on (a
//! close_notify and a FIN), idle sides timed out, a failure on one side ends both.
use std::{
    io,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

use super::{ByteCounters, Directions, End, Side, Timeouts, Totals};
use crate::stream::Stream;

/// The most a direction reads at once: one TLS record's worth of plaintext.
const CHUNK: usize = 16 << 10;

/// When each side last moved a byte, either way.
struct Clock {
    start: Instant,
    last: [AtomicU64; 2],
}

impl Clock {
    fn touch(&self, side: Side) {
        self.last[side.index()].store(self.start.elapsed().as_millis() as u64, Relaxed);
    }
    fn idle_deadline(&self, side: Side, timeouts: &Timeouts) -> Instant {
        self.start + Duration::from_millis(self.last[side.index()].load(Relaxed)) + timeouts.of(side)
    }
}

/// Forwards until both directions ended (with [`Directions::ServerToClient`]: until the server's
/// did; the client's bytes are read and dropped), one side failed, or one side idled out.
pub async fn forward(
    client: Stream,
    server: Stream,
    timeouts: Timeouts,
    bytes: ByteCounters<'_>,
    directions: Directions,
) -> (End, Totals) {
    let clock = Clock {
        start: Instant::now(),
        last: [AtomicU64::new(0), AtomicU64::new(0)],
    };
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    let drop_client = directions.dropped() == Some(Side::Client);
    let ctx = Pump {
        clock: &clock,
        timeouts: &timeouts,
        bytes,
    };
    let up = ctx.run(
        &mut client_rx,
        (!drop_client).then_some(&mut server_tx),
        Side::Client,
    );
    let down = ctx.run(&mut server_rx, Some(&mut client_tx), Side::Server);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let mut to_client = 0;
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(_) => up_done = true,
                Err(end) => return (end, Totals { kernel: 0, to_client }),
            },
            r = &mut down, if !down_done => match r {
                Ok(n) => {
                    down_done = true;
                    to_client = n;
                }
                Err(end) => return (end, Totals { kernel: 0, to_client }),
            },
        }
        if down_done && (up_done || drop_client) {
            return (End::Closed, Totals { kernel: 0, to_client });
        }
    }
}

struct Pump<'a> {
    clock: &'a Clock,
    timeouts: &'a Timeouts,
    bytes: ByteCounters<'a>,
}

impl Pump<'_> {
    /// Copies from `src` (side `from`) to `dst` until end of stream, then ends `dst`'s
    /// sending direction; without `dst`, reads and drops. The bytes copied, or how the flow
    /// ended when it did here.
    async fn run<R, W>(&self, src: &mut R, mut dst: Option<&mut W>, from: Side) -> Result<u64, End>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let to = from.other();
        let mut buf = vec![0u8; CHUNK];
        let mut moved = 0u64;
        // Bounded by the flow: each turn reads at least a byte, or the source idles out.
        loop {
            let n = loop {
                let deadline = self.clock.idle_deadline(from, self.timeouts);
                match tokio::time::timeout_at(deadline, src.read(&mut buf)).await {
                    Ok(Ok(n)) => break n,
                    // A TLS peer that closed without a close_notify: an end of stream still
                    // (what the bytes mean is the application's to judge, as with TCP).
                    Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break 0,
                    Ok(Err(_)) => return Err(End::Reset(from)),
                    // The side moved a byte the other way meanwhile: not idle yet.
                    Err(_) if Instant::now() < self.clock.idle_deadline(from, self.timeouts) => continue,
                    Err(_) => return Err(End::IdleTimeout(from)),
                }
            };
            self.clock.touch(from);
            let Some(dst) = dst.as_mut() else {
                if n == 0 {
                    return Ok(moved);
                }
                continue;
            };
            if n == 0 {
                // A TLS side gets a close_notify, then a FIN.
                return match tokio::time::timeout(self.timeouts.of(to), dst.shutdown()).await {
                    Ok(Ok(())) => Ok(moved),
                    Ok(Err(_)) => Err(End::Reset(to)),
                    Err(_) => Err(End::IdleTimeout(to)),
                };
            }
            let written = async {
                dst.write_all(&buf[..n]).await?;
                dst.flush().await
            };
            match tokio::time::timeout(self.timeouts.of(to), written).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(End::Reset(to)),
                Err(_) => return Err(End::IdleTimeout(to)),
            }
            self.clock.touch(to);
            self.bytes.add(n as u64);
            moved += n as u64;
        }
    }
}
