//! The integrity flow: the client sends a 24-byte header (bytes it sends, bytes it wants back,
//! a seed) and then its seeded random payload; the server answers with its own seeded random
//! bytes at the same time. Each end hashes what it sent and what it received with sha256, so a
//! test can check every byte both ways.
use std::{io, net::SocketAddr, sync::atomic::AtomicU64};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::paced::{self, Reading};

/// One flow's sizes and seed.
#[derive(Debug, Clone, Copy)]
pub struct FlowSpec {
    pub up: u64,
    pub down: u64,
    pub seed: u64,
}

/// What the client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientReport {
    pub seed: u64,
    pub sent: [u8; 32],
    pub received: [u8; 32],
    pub received_len: u64,
}

/// What the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReport {
    pub seed: u64,
    pub sent: [u8; 32],
    pub received: [u8; 32],
    pub received_len: u64,
}

/// Writes `len` seeded random bytes, then shuts the write side; returns their sha256.
async fn send_random(w: &mut (impl AsyncWriteExt + Unpin), seed: u64, len: u64) -> io::Result<[u8; 32]> {
    paced::write_seeded(w, seed, len, &AtomicU64::new(0)).await
}

/// Reads to end of stream, returning the sha256 and length.
async fn receive_all(r: &mut (impl AsyncReadExt + Unpin)) -> io::Result<([u8; 32], u64)> {
    paced::read_paced(r, Reading::FAST, 0).await
}

/// Runs one flow through `addr` (lb's listener) and returns what the client saw.
pub async fn run(addr: SocketAddr, spec: FlowSpec) -> io::Result<ClientReport> {
    let mut s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let send = async {
        let mut header = [0u8; 24];
        header[..8].copy_from_slice(&spec.up.to_le_bytes());
        header[8..16].copy_from_slice(&spec.down.to_le_bytes());
        header[16..].copy_from_slice(&spec.seed.to_le_bytes());
        w.write_all(&header).await?;
        send_random(&mut w, spec.seed, spec.up).await
    };
    let (sent, (received, received_len)) = tokio::try_join!(send, receive_all(&mut r))?;
    Ok(ClientReport {
        seed: spec.seed,
        sent,
        received,
        received_len,
    })
}

/// The server end of one flow.
pub async fn serve(mut s: TcpStream) -> io::Result<ServerReport> {
    let mut header = [0u8; 24];
    s.read_exact(&mut header).await?;
    // header[..8] is the client's own length, checked by the test against the report.
    let down = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let seed = u64::from_le_bytes(header[16..].try_into().unwrap());
    let (mut r, mut w) = s.split();
    let send = async {
        // The server's stream uses a different seed from the client's.
        send_random(&mut w, seed ^ 0x5eed_5eed_5eed_5eed, down).await
    };
    let (sent, (received, received_len)) = tokio::try_join!(send, receive_all(&mut r))?;
    Ok(ServerReport {
        seed,
        sent,
        received,
        received_len,
    })
}

/// Checks that each side received exactly what the other sent.
pub fn assert_intact(spec: &FlowSpec, client: &ClientReport, server: &ServerReport) {
    assert_exchange(
        spec.seed,
        (spec.up, spec.down),
        (client.sent, client.received, client.received_len),
        (server.sent, server.received, server.received_len),
    );
}

/// Checks one exchange of seeded bytes: `(up, down)` are the sizes each way; each end is
/// `(sha256 sent, sha256 received, bytes received)`.
pub fn assert_exchange(
    seed: u64,
    (up, down): (u64, u64),
    client: ([u8; 32], [u8; 32], u64),
    server: ([u8; 32], [u8; 32], u64),
) {
    assert_eq!(
        server.2, up,
        "seed {seed}: server received {} of {up} bytes",
        server.2
    );
    assert_eq!(
        client.2, down,
        "seed {seed}: client received {} of {down} bytes",
        client.2
    );
    assert_eq!(client.0, server.1, "seed {seed}: client→server sha256 differs");
    assert_eq!(server.0, client.1, "seed {seed}: server→client sha256 differs");
}
