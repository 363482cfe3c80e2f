//! Flows with slow readers: each end writes seeded random bytes as fast as its socket takes
//! them and reads what the other sends with pauses (a reader that stalls and resumes), hashing
//! both ways with sha256. The client's 40-byte header tells the server what to send and how it
//! should read.
use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::{
    io,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const CHUNK: usize = 64 * 1024;

/// How a reader reads: after each burst of `burst` bytes (drawn uniformly from the range) it
/// pauses for a time drawn from `pause_ms`; the first `stall_ms` it reads nothing at all.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub stall_ms: u64,
    pub burst: (u64, u64),
    pub pause_ms: (u64, u64),
}

impl Reading {
    /// Reads as fast as it can.
    pub const FAST: Reading = Reading {
        stall_ms: 0,
        burst: (u64::MAX, u64::MAX),
        pause_ms: (0, 0),
    };
}

/// One paced flow: sizes both ways, the seed, and how each end reads.
#[derive(Debug, Clone, Copy)]
pub struct PacedSpec {
    pub up: u64,
    pub down: u64,
    pub seed: u64,
    pub client_reads: Reading,
    pub server_reads: Reading,
}

/// What one end saw: sha256 of what it sent and of what it received, and how much it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndReport {
    pub sent: [u8; 32],
    pub received: [u8; 32],
    pub received_len: u64,
}

/// Writes `len` seeded random bytes, counting them into `written` as the socket takes them,
/// then shuts the write side; returns their sha256.
pub async fn write_seeded(
    w: &mut (impl AsyncWriteExt + Unpin),
    seed: u64,
    len: u64,
    written: &AtomicU64,
) -> io::Result<[u8; 32]> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hash.update(&buf[..n]);
        let mut part = &buf[..n];
        while !part.is_empty() {
            let k = w.write(part).await?;
            if k == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            part = &part[k..];
            written.fetch_add(k as u64, Relaxed);
        }
        left -= n as u64;
    }
    w.shutdown().await?;
    Ok(hash.finalize().into())
}

/// Reads to end of stream the way `reading` says (pauses drawn from `seed`); returns the
/// sha256 and the length.
pub async fn read_paced(
    r: &mut (impl AsyncReadExt + Unpin),
    reading: Reading,
    seed: u64,
) -> io::Result<([u8; 32], u64)> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x9ace);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    tokio::time::sleep(Duration::from_millis(reading.stall_ms)).await;
    loop {
        let mut burst = rng.gen_range(reading.burst.0..=reading.burst.1);
        while burst > 0 {
            let want = burst.min(CHUNK as u64) as usize;
            let n = r.read(&mut buf[..want]).await?;
            if n == 0 {
                return Ok((hash.finalize().into(), len));
            }
            hash.update(&buf[..n]);
            len += n as u64;
            burst -= n as u64;
        }
        let pause = rng.gen_range(reading.pause_ms.0..=reading.pause_ms.1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

fn header(spec: &PacedSpec) -> [u8; 40] {
    let mut h = [0u8; 40];
    let fields = [
        spec.down,
        spec.seed,
        spec.server_reads.stall_ms,
        spec.server_reads.burst.1,
        spec.server_reads.pause_ms.1,
    ];
    for (i, f) in fields.iter().enumerate() {
        h[i * 8..i * 8 + 8].copy_from_slice(&f.to_le_bytes());
    }
    h
}

/// Runs the client end of `spec` through `addr`; `written` counts the bytes it sent.
pub async fn run_client(addr: SocketAddr, spec: PacedSpec, written: &AtomicU64) -> io::Result<EndReport> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&header(&spec)).await?;
    let (mut r, mut w) = s.split();
    let (sent, (received, received_len)) = tokio::try_join!(
        write_seeded(&mut w, spec.seed, spec.up, written),
        read_paced(&mut r, spec.client_reads, spec.seed)
    )?;
    Ok(EndReport {
        sent,
        received,
        received_len,
    })
}

/// Serves one paced flow on an accepted connection; `written` counts the bytes it sent.
/// Returns the flow's seed with the report.
pub async fn serve(mut s: TcpStream, written: &AtomicU64) -> io::Result<(u64, EndReport)> {
    let mut h = [0u8; 40];
    s.read_exact(&mut h).await?;
    let field = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap());
    let (down, seed) = (field(0), field(1));
    // The server reads in bursts of 1..=max with pauses of 0..=max (the client's spec).
    let reading = Reading {
        stall_ms: field(2),
        burst: (1.min(field(3)), field(3)),
        pause_ms: (0, field(4)),
    };
    let (mut r, mut w) = s.split();
    let (sent, (received, received_len)) = tokio::try_join!(
        write_seeded(&mut w, seed ^ 0x5eed, down, written),
        read_paced(&mut r, reading, seed ^ 0x5e)
    )?;
    Ok((
        seed,
        EndReport {
            sent,
            received,
            received_len,
        },
    ))
}

/// Checks each end received exactly what the other sent.
pub fn assert_intact(spec: &PacedSpec, client: &EndReport, server: &EndReport) {
    crate::flows::assert_exchange(
        spec.seed,
        (spec.up, spec.down),
        (client.sent, client.received, client.received_len),
        (server.sent, server.received, server.received_len),
    );
}

/// A server for paced flows on 127.0.0.1: each flow's report, with its seed, goes to `reports`.
pub fn serve_into(reports: tokio::sync::mpsc::UnboundedSender<(u64, EndReport)>) -> SocketAddr {
    let l = crate::servers::listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let reports = reports.clone();
            tokio::spawn(async move {
                if let Ok(r) = serve(s, &AtomicU64::new(0)).await {
                    let _ = reports.send(r);
                }
            });
        }
    });
    addr
}
