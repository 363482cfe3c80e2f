//! The forwarding stage for a flow with a TLS side: without kTLS the kernel cannot read or
//! write TLS records, so lb copies (decrypting on one side, encrypting on the other) until the
//! flow ends, under the same contract as the other two paths: end of stream passed on, idle
//! sides timed out, and a flow that ends any other way than both sides closing (a failure, an
//! idle timeout, lb's grace period running out) closed with a reset on both sides.
//!
//! End of stream from a TLS side is passed on as it came: after a close_notify, a TLS
//! destination gets a close_notify and a FIN; without one (a peer that only closed TCP, which
//! an attacker on the path can fake), a TLS destination gets a bare FIN, so its peer sees the
//! stream was cut rather than a complete, authenticated one.
use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt, WriteHalf},
    time::Instant,
};

use super::{
    user::{Clock, ResetOnDrop},
    ByteCounters, Directions, End, Side, Timeouts, Totals,
};
use crate::stream::Stream;

/// The most a direction reads at once: one TLS record's worth of plaintext.
const CHUNK: usize = 16 << 10;

/// Forwards until both directions ended (with [`Directions::ServerToClient`]: until the server's
/// did; the client's bytes are read and dropped), one side failed, or one side idled out.
pub async fn forward(
    client: Stream,
    server: Stream,
    timeouts: Timeouts,
    bytes: ByteCounters<'_>,
    directions: Directions,
) -> (End, Totals) {
    let fds = [client.as_raw_fd(), server.as_raw_fd()];
    let clock = Clock {
        start: Instant::now(),
        last: [AtomicU64::new(0), AtomicU64::new(0)],
    };
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    // Declared after the halves that own the sockets, so dropped before them: SO_LINGER 0 is
    // set before they close. Armed unless the flow closed: a failure, an idle timeout or this
    // future being dropped (lb's grace period over) resets both peers.
    let mut guard = ResetOnDrop { fds, armed: true };
    let drop_client = directions.dropped() == Some(Side::Client);
    let to_client = AtomicU64::new(0);
    let pump = Pump {
        clock: &clock,
        timeouts: &timeouts,
        bytes,
    };
    let up = pump.run(
        &mut client_rx,
        (!drop_client).then_some((&mut server_tx, fds[1])),
        Side::Client,
        None,
    );
    let down = pump.run(
        &mut server_rx,
        Some((&mut client_tx, fds[0])),
        Side::Server,
        Some(&to_client),
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let end = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(end) => break end,
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(end) => break end,
            },
        }
        if down_done && (up_done || drop_client) {
            guard.armed = false;
            break End::Closed;
        }
    };
    // (Only tunnels come here, both ways and unbounded: a response body with a TLS side is
    // never handed on.)
    let totals = Totals {
        kernel: 0,
        to_client: to_client.load(Relaxed),
        past_limit: 0,
    };
    (end, totals)
}

struct Pump<'a> {
    clock: &'a Clock,
    timeouts: &'a Timeouts,
    bytes: ByteCounters<'a>,
}

/// How a source's stream ended.
enum Ended {
    /// A close_notify (TLS), or a FIN (TCP).
    Clean,
    /// A TLS peer that closed TCP without a close_notify.
    Truncated,
}

impl Pump<'_> {
    /// Copies from `src` (side `from`) to `dst` until end of stream, then ends `dst`'s sending
    /// direction as the source's ended; without `dst`, reads and drops. `sent`: where the bytes
    /// written are counted as they go. `Err`: how the flow ended, when it did here.
    async fn run<R: AsyncRead + Unpin>(
        &self,
        src: &mut R,
        mut dst: Option<(&mut WriteHalf<Stream>, RawFd)>,
        from: Side,
        sent: Option<&AtomicU64>,
    ) -> Result<(), End> {
        let to = from.other();
        let mut buf = vec![0u8; CHUNK];
        // Bounded by the flow: each turn reads at least a byte, or the source ends or idles out.
        loop {
            let n = match self.read(src, &mut buf, from).await? {
                Ok(n) => n,
                Err(ended) => {
                    let Some((dst, fd)) = dst.as_mut() else {
                        return Ok(());
                    };
                    return self.end(dst, *fd, ended, to).await;
                }
            };
            self.clock.touch(from);
            let Some((dst, _)) = dst.as_mut() else { continue };
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
            if let Some(sent) = sent {
                sent.fetch_add(n as u64, Relaxed);
            }
        }
    }

    /// The next bytes from `src` (`Ok(Ok(n))`, n > 0), or how its stream ended.
    async fn read<R: AsyncRead + Unpin>(
        &self,
        src: &mut R,
        buf: &mut [u8],
        from: Side,
    ) -> Result<Result<usize, Ended>, End> {
        loop {
            let deadline = self.clock.last(from) + self.timeouts.of(from);
            match tokio::time::timeout_at(deadline, src.read(buf)).await {
                Ok(Ok(0)) => return Ok(Err(Ended::Clean)),
                Ok(Ok(n)) => return Ok(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Err(Ended::Truncated)),
                Ok(Err(e)) => {
                    tracing::debug!(side = from.name(), "read failed: {e}");
                    return Err(End::Reset(from));
                }
                // The side moved a byte the other way meanwhile: not idle yet.
                Err(_) if Instant::now() < self.clock.last(from) + self.timeouts.of(from) => continue,
                Err(_) => return Err(End::IdleTimeout(from)),
            }
        }
    }

    /// Ends `dst`'s sending direction as the source's ended: a clean end as TLS or TCP ends a
    /// stream (close_notify, FIN); a truncated one with a bare FIN.
    async fn end(&self, dst: &mut WriteHalf<Stream>, fd: RawFd, ended: Ended, to: Side) -> Result<(), End> {
        match ended {
            Ended::Clean => match tokio::time::timeout(self.timeouts.of(to), dst.shutdown()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::Reset(to)),
                Err(_) => Err(End::IdleTimeout(to)),
            },
            Ended::Truncated => {
                // What lb passed on is flushed; the TLS layer is left without its close_notify.
                // SAFETY: shutdown(2) on the fd of a socket the flow owns.
                if unsafe { libc::shutdown(fd, libc::SHUT_WR) } == 0 {
                    Ok(())
                } else {
                    Err(End::Reset(to))
                }
            }
        }
    }
}
