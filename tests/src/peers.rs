//! Peers that behave like real ones, not like lb's own fixtures (used by tests/peers.rs and by
//! `cargo xtask bench tcp`'s offload-share table): a serial echo server that does not read
//! while it writes, a server that answers pipelined requests while the client keeps sending,
//! and a server that streams while reading the client at a pace, with clients for each that
//! check every byte (sha256 both ways) and report how long the flow took.
//!
//! They are plain blocking sockets on threads, like the simple servers users run.
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

/// Size of a request (and of its answer) of [`answer`].
pub const REQUEST: usize = 1024;
/// What the serial echo server reads before it writes it all back.
const ECHO_ROUND: usize = 1 << 20;
const CHUNK: usize = 256 << 10;

/// Seeded random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Serves every connection of `l` on a thread of its own with `serve`.
pub fn serve_forever(l: TcpListener, serve: fn(TcpStream)) {
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || serve(s));
        }
    });
}

/// Binds a listener with room for hundreds of connections at once in its accept queue. The
/// standard library's (and tokio's) backlog is 128: when hundreds of flows start together
/// the queue overflows, the kernel answers with SYN cookies, and some of those connections
/// are reset after lb has connected them (seen as `Reset(Server)` 1 s in, and a client that
/// fails its check).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The accept queue of [`bind`] (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// A listener on 127.0.0.1 whose every connection is served by `serve` on its own thread.
pub fn server(serve: fn(TcpStream)) -> SocketAddr {
    let l = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = l.local_addr().unwrap();
    serve_forever(l, serve);
    addr
}

/// Sleeps until `done` bytes are due at `rate` bytes per second since `started` (no pacing if
/// `rate` is 0).
fn pace(started: Instant, done: usize, rate: f64) {
    if rate > 0.0 {
        let due = Duration::from_secs_f64(done as f64 / rate);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            thread::sleep(ahead);
        }
    }
}

/// Reads until end of stream at most `rate` bytes per second (unpaced if 0); returns the
/// sha256 and the length of what it read.
pub fn read_all(s: &mut TcpStream, rate: f64) -> ([u8; 32], usize) {
    let started = Instant::now();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0usize;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        hash.update(&buf[..n]);
        got += n;
        pace(started, got, rate);
    }
    (hash.finalize().into(), got)
}

/// Writes `data` at most `rate` bytes per second (unpaced if 0), then half-closes.
pub fn write_all(s: &mut TcpStream, data: &[u8], rate: f64) {
    write_paced(s, data, rate);
    let _ = s.shutdown(Shutdown::Write);
}

/// Writes `data` at most `rate` bytes per second (unpaced if 0).
pub fn write_paced(s: &mut TcpStream, data: &[u8], rate: f64) {
    let started = Instant::now();
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        if s.write_all(chunk).is_err() {
            return;
        }
        pace(started, (i + 1) * CHUNK, rate);
    }
}

/// A serial echo server: reads up to 1 MiB, then writes it all back, reading nothing while
/// it writes; at end of stream, closes.
pub fn serial_echo(mut s: TcpStream) {
    let mut buf = vec![0u8; ECHO_ROUND];
    loop {
        let mut have = 0;
        while have < buf.len() {
            match s.read(&mut buf[have..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => have += n,
            }
        }
        if have == 0 || s.write_all(&buf[..have]).is_err() {
            break;
        }
        if have < buf.len() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Sends `data` through a new connection to `addr` while reading what comes back, then
/// half-closes; returns the sha256 and length of what came back, and the time taken.
fn exchange(addr: SocketAddr, data: Vec<u8>) -> Result<([u8; 32], usize, Duration), String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let mut r = s.try_clone().map_err(|e| e.to_string())?;
    let reader = thread::spawn(move || read_all(&mut r, 0.0));
    write_all(&mut s, &data, 0.0);
    let (hash, len) = reader.join().map_err(|_| "the reader panicked".to_string())?;
    Ok((hash, len, started.elapsed()))
}

/// One flow against [`serial_echo`]: sends `size` seeded bytes while reading the echo.
/// Returns the time taken, or what went wrong.
pub fn echo_flow(addr: SocketAddr, seed: u64, size: usize) -> Result<Duration, String> {
    let data = bytes(seed, size);
    let expected = sha(&data);
    let (hash, len, took) = exchange(addr, data)?;
    if (len, hash) != (size, expected) {
        return Err(format!("flow {seed}: the echo differs ({len} of {size} bytes)"));
    }
    Ok(took)
}

/// Answers each [`REQUEST`]-byte request at once with its bytes inverted, before the next is
/// read, until end of stream.
pub fn answer(mut s: TcpStream) {
    let mut req = [0u8; REQUEST];
    while s.read_exact(&mut req).is_ok() {
        req.iter_mut().for_each(|b| *b = !*b);
        if s.write_all(&req).is_err() {
            return;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// One flow against [`answer`]: sends `requests` requests without waiting for the answers
/// (pipelining) while reading them. Returns the time taken, or what went wrong.
pub fn answer_flow(addr: SocketAddr, seed: u64, requests: usize) -> Result<Duration, String> {
    let requests = bytes(seed, REQUEST * requests);
    let answers: Vec<u8> = requests.iter().map(|b| !b).collect();
    let (hash, len, took) = exchange(addr, requests)?;
    if (len, hash) != (answers.len(), sha(&answers)) {
        return Err(format!(
            "flow {seed}: the answers differ ({len} of {} bytes)",
            answers.len()
        ));
    }
    Ok(took)
}

/// A server that streams what the client's 24-byte header asks for (length, seed, its own read
/// rate), reading the client's bytes at that rate meanwhile, hashes them, and ends with the
/// hash and the length (after its own stream: the client reads that far).
pub fn stream_and_read(mut s: TcpStream) {
    let mut h = [0u8; 24];
    if s.read_exact(&mut h).is_err() {
        return;
    }
    let field = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap());
    let (len, seed, read_rate) = (field(0) as usize, field(1), f64::from_bits(field(2)));
    let Ok(mut w) = s.try_clone() else { return };
    let writer = thread::spawn(move || {
        let data = bytes(seed, len);
        let _ = w.write_all(&data);
    });
    let (hash, got) = read_all(&mut s, read_rate);
    let _ = writer.join();
    let _ = s.write_all(&hash);
    let _ = s.write_all(&(got as u64).to_le_bytes());
    let _ = s.shutdown(Shutdown::Write);
}

/// One flow against [`stream_and_read`]: the server sends `down` bytes, the client sends `up`
/// bytes; each side reads at its rate (0: unpaced). Checks both ways; returns the time taken,
/// or what went wrong.
pub fn streamed(
    addr: SocketAddr,
    seed: u64,
    down: usize,
    up: usize,
    client_rate: f64,
    server_rate: f64,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let mut header = Vec::new();
    for f in [down as u64, seed, server_rate.to_bits()] {
        header.extend_from_slice(&f.to_le_bytes());
    }
    s.write_all(&header).map_err(|e| format!("header: {e}"))?;
    let mut r = s.try_clone().map_err(|e| e.to_string())?;
    let (streamed, stream_done) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        // The stream, then the server's 40-byte report.
        let reading = Instant::now();
        let mut got = Vec::with_capacity(down + 40);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            got.extend_from_slice(&buf[..n]);
            if got.len() >= down {
                let _ = streamed.send(());
            }
            pace(reading, got.len(), client_rate);
        }
        // The flow's time ends with its last byte, not with the checks below (hashing hundreds
        // of MiB takes a good part of a second).
        (got, started.elapsed())
    });
    let data = bytes(seed ^ 0xfeed, up);
    write_paced(&mut s, &data, 0.0);
    // The half-close only once the stream is in: a side that ended its stream cannot go to
    // the kernel (the SOCKHASH takes established sockets only), and the server's report
    // follows the client's end.
    let _ = stream_done.recv();
    let _ = s.shutdown(Shutdown::Write);
    let (got, took) = reader.join().map_err(|_| "the reader panicked".to_string())?;
    if got.len() != down + 40 {
        return Err(format!(
            "flow {seed}: the stream was cut ({} of {} bytes)",
            got.len(),
            down + 40
        ));
    }
    if sha(&got[..down]) != sha(&bytes(seed, down)) {
        return Err(format!("flow {seed}: the stream differs"));
    }
    let report = &got[down..];
    if report[..32] != sha(&data) || u64::from_le_bytes(report[32..].try_into().unwrap()) != up as u64 {
        return Err(format!("flow {seed}: the server got other bytes"));
    }
    Ok(took)
}

/// Runs `flows` clients at once; each gets its index and returns its result.
pub fn run_flows<T: Send>(flows: usize, client: impl Fn(usize) -> T + Sync) -> Vec<T> {
    thread::scope(|scope| {
        let handles: Vec<_> = (0..flows)
            .map(|i| {
                let client = &client;
                scope.spawn(move || client(i))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a flow's thread panicked"))
            .collect()
    })
}
