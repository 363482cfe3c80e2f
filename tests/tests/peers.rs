//! Peers that behave like real ones, not like lb's own fixtures, on both forwarding paths (the
//! kernel path with its default hand-off after `offload_after`, and userspace): a serial echo
//! server that does not read while it writes, a server that answers pipelined requests while
//! the client keeps sending, readers paced at 100 MB/s and 10 MB/s, both sides slow at once,
//! and hundreds of flows with random sizes and pauses. Every byte is checked (sha256 both
//! ways) and every flow must end within its transfer time plus a second: a flow that waits on
//! something that cannot happen shows here as a late or cut flow.
//!
//! The peers are plain blocking sockets on threads, like the simple servers users run; the
//! tests take turns (one lb at a time) so that their timings are their own.
use lb_tests::{
    bpf_available,
    lb::{Lb, LbBuilder},
    paced::{self, PacedSpec, Reading},
};
use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{atomic::AtomicU64, Mutex},
    thread,
    time::{Duration, Instant},
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How lb forwards in a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The kernel path with lb's defaults: userspace first, handed to the kernel after
    /// `offload_after` (64 KiB) one way.
    Kernel,
    User,
}

impl Mode {
    /// The modes this machine can run (the kernel path needs root and the eBPF program).
    fn available(test: &str) -> Vec<Mode> {
        match bpf_available(test) {
            true => vec![Mode::Kernel, Mode::User],
            false => vec![Mode::User],
        }
    }

    fn lb(self, servers: &[SocketAddr]) -> Lb {
        // A stalled flow is cut at these idle timeouts (and then fails its check) rather than
        // left to the test's bound.
        let b = LbBuilder::new(servers)
            .timeout("client", "20s")
            .backend_timeout("server", "20s");
        match self {
            Mode::Kernel => b.arg("--forwarding").arg("kernel"),
            Mode::User => b.arg("--forwarding").arg("user"),
        }
        .spawn()
    }
}

/// Share of the payload bytes the kernel forwarded.
fn kernel_share(lb: &Lb) -> f64 {
    let m = lb.metrics();
    let kernel = m.get("lb_forwarded_bytes_total{path=\"kernel\"}");
    let user = m.get("lb_forwarded_bytes_total{path=\"user\"}");
    kernel / (kernel + user).max(1.0)
}

/// Checks the kernel path kept most of the bytes: a flow that never left userspace (a
/// hand-off waiting for a socket a sender never lets empty) shows as a low share.
fn check_share(mode: Mode, lb: &Lb, what: &str) {
    if mode == Mode::Kernel {
        let share = kernel_share(lb);
        assert!(
            share > 0.5,
            "{what}: the kernel forwarded only {:.1} %",
            share * 100.0
        );
    }
}

/// Seeded random bytes.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A listener whose every connection is served on a thread of its own by `serve`.
fn server(serve: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || serve(s));
        }
    });
    addr
}

/// Reads until end of stream at most `rate` bytes per second (unpaced if 0); returns the
/// sha256 and the length of what it read.
fn read_all(s: &mut TcpStream, rate: f64) -> ([u8; 32], usize) {
    let started = Instant::now();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0usize;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        hash.update(&buf[..n]);
        got += n;
        if rate > 0.0 {
            let due = Duration::from_secs_f64(got as f64 / rate);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                thread::sleep(ahead);
            }
        }
    }
    (hash.finalize().into(), got)
}

/// Writes `data` at most `rate` bytes per second (unpaced if 0), then half-closes.
fn write_all(s: &mut TcpStream, data: &[u8], rate: f64) {
    write_paced(s, data, rate);
    let _ = s.shutdown(Shutdown::Write);
}

/// Writes `data` at most `rate` bytes per second (unpaced if 0).
fn write_paced(s: &mut TcpStream, data: &[u8], rate: f64) {
    let started = Instant::now();
    for (i, chunk) in data.chunks(256 << 10).enumerate() {
        if s.write_all(chunk).is_err() {
            return;
        }
        if rate > 0.0 {
            let due = Duration::from_secs_f64(((i + 1) * (256 << 10)) as f64 / rate);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                thread::sleep(ahead);
            }
        }
    }
}

/// A serial echo server: reads up to 1 MiB, then writes it all back, reading nothing while
/// it writes; at end of stream, closes.
fn serial_echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 1 << 20];
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

/// Runs `flows` clients at once; each gets its index and returns how long it took. Panics
/// (with the flow's index) if one fails its own check.
fn run_flows(flows: usize, client: impl Fn(usize) -> Duration + Sync) -> Vec<Duration> {
    thread::scope(|scope| {
        let handles: Vec<_> = (0..flows)
            .map(|i| {
                let client = &client;
                scope.spawn(move || client(i))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_serial_echo_server_never_stalls_a_flow() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const FLOWS: usize = 12;
    const SIZE: usize = 16 << 20;
    let echo = server(serial_echo);
    for mode in Mode::available("a_serial_echo_server_never_stalls_a_flow") {
        let lb = mode.lb(&[echo]);
        for round in 0..3u64 {
            let took = run_flows(FLOWS, |i| {
                let data = bytes(round * 100 + i as u64, SIZE);
                let started = Instant::now();
                let mut s = TcpStream::connect(lb.listener).unwrap();
                let mut r = s.try_clone().unwrap();
                let reader = thread::spawn(move || read_all(&mut r, 0.0));
                write_all(&mut s, &data, 0.0);
                let (hash, len) = reader.join().unwrap();
                assert_eq!(
                    (len, hash),
                    (SIZE, sha(&data)),
                    "{mode:?} round {round} flow {i}: the echo differs"
                );
                started.elapsed()
            });
            let slowest = took.iter().max().unwrap();
            // Unpaced: far less than this, unless a flow waited for its idle timeout.
            assert!(
                *slowest < Duration::from_secs(15),
                "{mode:?} round {round}: a flow took {slowest:?}"
            );
        }
        check_share(mode, &lb, "serial echo");
    }
}

#[test]
fn a_server_answers_pipelined_requests_while_the_client_sends() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const REQUEST: usize = 1024;
    const REQUESTS: usize = 16 * 1024;
    // Each 1 KiB request is answered at once with its bytes inverted, before the next is read.
    fn answer(mut s: TcpStream) {
        let mut req = [0u8; REQUEST];
        while s.read_exact(&mut req).is_ok() {
            req.iter_mut().for_each(|b| *b = !*b);
            if s.write_all(&req).is_err() {
                return;
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    }
    let addr = server(answer);
    for mode in Mode::available("a_server_answers_pipelined_requests_while_the_client_sends") {
        let lb = mode.lb(&[addr]);
        run_flows(4, |i| {
            let requests = bytes(7 + i as u64, REQUEST * REQUESTS);
            let answers: Vec<u8> = requests.iter().map(|b| !b).collect();
            let started = Instant::now();
            let mut s = TcpStream::connect(lb.listener).unwrap();
            let mut r = s.try_clone().unwrap();
            let reader = thread::spawn(move || read_all(&mut r, 0.0));
            write_all(&mut s, &requests, 0.0);
            let (hash, len) = reader.join().unwrap();
            assert_eq!(
                (len, hash),
                (answers.len(), sha(&answers)),
                "{mode:?} flow {i}: the answers differ"
            );
            let took = started.elapsed();
            assert!(took < Duration::from_secs(15), "{mode:?} flow {i} took {took:?}");
            took
        });
        check_share(mode, &lb, "pipelined requests");
    }
}

/// A server that streams what the client's 16-byte header asks for (length, seed), reading
/// the client's bytes at the rate in the header meanwhile, hashes them, and ends with the
/// hash (after its own stream: the client reads that far).
fn stream_and_read(mut s: TcpStream) {
    let mut h = [0u8; 24];
    if s.read_exact(&mut h).is_err() {
        return;
    }
    let field = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap());
    let (len, seed, read_rate) = (field(0) as usize, field(1), f64::from_bits(field(2)));
    let mut w = s.try_clone().unwrap();
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
/// bytes; each side reads at its rate (0: unpaced). Checks both ways; returns the time taken.
fn streamed(lb: &Lb, seed: u64, down: usize, up: usize, client_rate: f64, server_rate: f64) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(lb.listener).unwrap();
    let mut header = Vec::new();
    for f in [down as u64, seed, server_rate.to_bits()] {
        header.extend_from_slice(&f.to_le_bytes());
    }
    s.write_all(&header).unwrap();
    let mut r = s.try_clone().unwrap();
    let (streamed, stream_done) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        // The stream, then the server's 40-byte report.
        let started = Instant::now();
        let mut got = Vec::with_capacity(down + 40);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            got.extend_from_slice(&buf[..n]);
            if got.len() >= down {
                let _ = streamed.send(());
            }
            if client_rate > 0.0 {
                let due = Duration::from_secs_f64(got.len() as f64 / client_rate);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    thread::sleep(ahead);
                }
            }
        }
        got
    });
    let data = bytes(seed ^ 0xfeed, up);
    write_paced(&mut s, &data, 0.0);
    // The half-close only once the stream is in: a side that ended its stream cannot go to
    // the kernel (the SOCKHASH takes established sockets only), and the server's report
    // follows the client's end.
    let _ = stream_done.recv();
    let _ = s.shutdown(Shutdown::Write);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), down + 40, "flow {seed}: the stream was cut");
    assert!(
        sha(&got[..down]) == sha(&bytes(seed, down)),
        "flow {seed}: the stream differs"
    );
    let report = &got[down..];
    assert!(
        report[..32] == sha(&data),
        "flow {seed}: the server got other bytes"
    );
    assert_eq!(u64::from_le_bytes(report[32..].try_into().unwrap()), up as u64);
    started.elapsed()
}

#[test]
fn paced_readers_get_the_stream_within_its_time() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let addr = server(stream_and_read);
    for mode in Mode::available("paced_readers_get_the_stream_within_its_time") {
        let lb = mode.lb(&[addr]);
        for (rate, size) in [(100e6, 96usize << 20), (10e6, 12 << 20)] {
            let took = run_flows(2, |i| streamed(&lb, i as u64, size, 0, rate, 0.0));
            let due = Duration::from_secs_f64(size as f64 / rate) + Duration::from_secs(1);
            for t in took {
                assert!(
                    t <= due,
                    "{mode:?}: a reader paced at {rate} B/s took {t:?} for {size} bytes"
                );
            }
        }
        check_share(mode, &lb, "paced readers");
    }
}

#[test]
fn both_sides_slow_at_once() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let addr = server(stream_and_read);
    for mode in Mode::available("both_sides_slow_at_once") {
        let lb = mode.lb(&[addr]);
        const SIZE: usize = 24 << 20;
        const RATE: f64 = 20e6;
        let took = run_flows(2, |i| streamed(&lb, 10 + i as u64, SIZE, SIZE, RATE, RATE));
        let due = Duration::from_secs_f64(SIZE as f64 / RATE) + Duration::from_secs(1);
        for t in took {
            assert!(
                t <= due,
                "{mode:?}: a flow with both sides at {RATE} B/s took {t:?}"
            );
        }
        check_share(mode, &lb, "both sides slow");
    }
}

#[test]
fn hundreds_of_flows_with_random_sizes_and_pauses() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(r) = paced::serve(s, &AtomicU64::new(0)).await {
                        let _ = tx.send(r);
                    }
                });
            }
        });
        for mode in Mode::available("hundreds_of_flows_with_random_sizes_and_pauses") {
            let lb = mode.lb(&[addr]);
            let mut rng = SmallRng::seed_from_u64(42);
            let reading = |rng: &mut SmallRng| Reading {
                stall_ms: rng.gen_range(0..50),
                burst: (1 << 10, rng.gen_range(16u64 << 10..1 << 20)),
                pause_ms: (0, rng.gen_range(0..20)),
            };
            let specs: Vec<PacedSpec> = (0..300u64)
                .map(|seed| PacedSpec {
                    up: rng.gen_range(0..1 << 20),
                    down: rng.gen_range(0..2 << 20),
                    seed,
                    client_reads: reading(&mut rng),
                    server_reads: reading(&mut rng),
                })
                .collect();
            let target = lb.listener;
            let tasks: Vec<_> = specs
                .iter()
                .map(|&spec| {
                    tokio::spawn(async move { paced::run_client(target, spec, &AtomicU64::new(0)).await })
                })
                .collect();
            let (clients, by_seed) =
                lb_tests::gather(tasks, &mut reports, |r| r.0, Duration::from_secs(120)).await;
            for (spec, client) in specs.iter().zip(&clients) {
                paced::assert_intact(spec, client, &by_seed[&spec.seed].1);
            }
        }
    });
}
