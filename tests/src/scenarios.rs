//! The forwarding contract, written once and run against both paths (`tests/kernel_path.rs`,
//! `tests/user_path.rs`): integrity, no stall on early bytes, half-close both ways, many flows.
//! The bulk transfers shrink by `LB_TEST_SCALE` ([`crate::scale`]) on slow emulated machines.
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use crate::{
    flows::{self, FlowSpec},
    lb::{Lb, LbBuilder},
    servers,
};

/// Which forwarding path a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Kernel,
    User,
}

impl Path {
    /// lb forwarding `servers`, with the path forced on the command line. The kernel path
    /// takes every flow at once (`offload_after: 0`): these scenarios test its contract; the
    /// hand-off from userspace has tests of its own.
    pub fn lb(self, servers: &[std::net::SocketAddr]) -> LbBuilder {
        match self {
            Path::Kernel => LbBuilder::new(servers)
                .offload_after("0")
                .arg("--forwarding")
                .arg("kernel"),
            Path::User => LbBuilder::new(servers).arg("--forwarding").arg("user"),
        }
    }

    /// Kernel path: waits (bounded) until lb has put `flows` flows into the SOCKHASH, so a test
    /// that half-closes at once exercises the kernel's FIN handling rather than the userspace
    /// fallback for sockets that were closing before insertion. User path: returns at once.
    pub async fn wait_until_forwarding(self, lb: &Lb, flows: usize) {
        if self == Path::Kernel {
            lb.wait_for("the flow to be in the kernel", |m| {
                m.get("lb_kernel_flows") == flows as f64
            })
            .await;
        }
    }

    /// Checks the bytes went where they should: by the kernel (the daemon copying only what the
    /// program held back), or all in userspace.
    pub async fn assert_bytes_path(self, lb: &Lb, at_least: u64) {
        // A copy loop counts a chunk after writing it, and a kernel flow's bytes are counted as
        // it ends: the peer can have the last bytes before lb has counted them.
        let m = lb
            .wait_for("every forwarded byte counted", |m| {
                m.kernel_bytes() + m.user_bytes() >= at_least as f64
            })
            .await;
        let (kernel, user) = (m.kernel_bytes(), m.user_bytes());
        match self {
            Path::Kernel => {
                // Shown with --nocapture: retransmitted overlaps the program trimmed (rare).
                eprintln!(
                    "lb_kernel_trimmed_bytes_total {}",
                    m.get("lb_kernel_trimmed_bytes_total")
                );
                assert_eq!(
                    m.get("lb_kernel_forwarding"),
                    1.0,
                    "kernel forwarding not active:\n{}",
                    m.text
                );
                assert!(
                    kernel + user >= at_least as f64 && kernel >= at_least as f64 / 2.0,
                    "kernel path: {kernel} kernel + {user} user bytes, expected >= {at_least} mostly by the kernel:\n{}",
                    m.text
                );
                // The daemon copies only what the program held back for it (a brake, or bytes
                // that arrived before both sockets were in the map): never a silent fallback.
                assert!(
                    user <= m.get("lb_kernel_passed_bytes_total"),
                    "kernel path: {user} bytes copied in userspace that the program did not hold:\n{}",
                    m.text
                );
                assert_eq!(
                    m.get("lb_kernel_duplicated_bytes_total"),
                    0.0,
                    "the program took bytes twice:\n{}",
                    m.text
                );
                assert_eq!(
                    m.get("lb_kernel_untrimmed_segments_total"),
                    0.0,
                    "the program forwarded a repeated segment head:\n{}",
                    m.text
                );
                assert_eq!(
                    m.sum("lb_kernel_fallbacks_total"),
                    0.0,
                    "flows fell back to userspace:\n{}",
                    m.text
                );
            }
            Path::User => {
                assert!(
                    user >= at_least as f64,
                    "user path: only {user} user bytes, expected >= {at_least}"
                );
                assert_eq!(kernel, 0.0, "user path: the kernel forwarded {kernel} bytes");
            }
        }
    }
}

/// Bound on any single scenario, so a stall fails the test instead of hanging the suite.
const BOUND: Duration = Duration::from_secs(240);

/// Runs integrity flows concurrently through a fresh lb and checks every one.
async fn run_flows(path: Path, specs: Vec<FlowSpec>) -> Lb {
    let (server, mut reports) = servers::integrity().await;
    let lb = path.lb(&[server]).spawn();
    let addr = lb.listener;
    let tasks: Vec<_> = specs
        .iter()
        .map(|&spec| tokio::spawn(flows::run(addr, spec)))
        .collect();
    let (clients, by_seed) = crate::gather(tasks, &mut reports, |r| r.seed, BOUND).await;
    for (spec, client) in specs.iter().zip(&clients) {
        let check = || flows::assert_intact(spec, client, &by_seed[&spec.seed]);
        if let Err(panic) = std::panic::catch_unwind(check) {
            // What lb counted tells which side broke the stream (trimmed, duplicated bytes).
            eprintln!("lb's metrics at the failure:\n{}", lb.metrics().text);
            std::panic::resume_unwind(panic);
        }
    }
    lb
}

/// 256 MiB (scaled) each way at once through lb; sha256 equal both ways; the bytes took `path`.
pub async fn big_transfer(path: Path) {
    let size = crate::scaled(256 << 20) as u64;
    let lb = run_flows(
        path,
        vec![FlowSpec {
            up: size,
            down: size,
            seed: 1,
        }],
    )
    .await;
    path.assert_bytes_path(&lb, 2 * size).await;
}

/// 200 concurrent flows of random sizes (1 B to 8 MiB, log-uniform, each way), all intact.
pub async fn many_flows(path: Path) {
    let mut rng = SmallRng::seed_from_u64(200);
    let size = |rng: &mut SmallRng| (2f64.powf(rng.gen_range(0.0..23.0)) as u64).clamp(1, 8 << 20);
    let specs: Vec<FlowSpec> = (0..200)
        .map(|i| FlowSpec {
            up: size(&mut rng),
            down: size(&mut rng),
            seed: 1000 + i,
        })
        .collect();
    let total: u64 = specs.iter().map(|s| s.up + s.down).sum();
    let lb = run_flows(path, specs).await;
    match path {
        Path::User => path.assert_bytes_path(&lb, total).await,
        // Flows whose client sent everything and its FIN before lb inserted the sockets stay
        // in userspace (the kernel refuses a socket that is no longer ESTABLISHED).await; how many
        // depends on timing, so only the sum and the use of both paths' counters is checked.
        Path::Kernel => {
            let m = lb
                .wait_for("every forwarded byte counted", |m| {
                    m.kernel_bytes() + m.user_bytes() >= total as f64
                })
                .await;
            assert!(m.kernel_bytes() > 0.0, "{}", m.text);
        }
    }
}

/// A client that writes right after connecting and then waits for the reply gets it, for a
/// 1-byte and a 64 KiB request, many times over (the bytes usually arrive before lb has put
/// the sockets in the map).
pub async fn early_bytes_do_not_stall(path: Path) {
    let echo = servers::echo().await;
    let lb = path.lb(&[echo]).spawn();
    for size in [1usize, 64 * 1024] {
        for round in 0..25 {
            let msg: Vec<u8> = (0..size).map(|i| (i * 7 + round) as u8).collect();
            let mut s = TcpStream::connect(lb.listener).await.unwrap();
            s.write_all(&msg).await.unwrap();
            let mut back = vec![0u8; size];
            timeout(Duration::from_secs(10), s.read_exact(&mut back))
                .await
                .unwrap_or_else(|_| {
                    panic!("{size}-byte request, round {round}: no reply within 10 s (stalled)")
                })
                .unwrap();
            assert_eq!(back, msg, "{size}-byte request, round {round}");
        }
    }
    // Each byte went out and came back: two passes through lb per byte.
    path.assert_bytes_path(&lb, 2 * 25 * (1 + 64 * 1024)).await;
}

/// The client sends and shuts down writing; the server sees EOF, replies, closes; the client
/// reads the whole reply and then EOF.
pub async fn half_close_client_first(path: Path) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = path.lb(&[l.local_addr().unwrap()]).spawn();
    let request: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let reply: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
    let server = {
        let reply = reply.clone();
        tokio::spawn(async move {
            let mut s = servers::accept_one(&l).await;
            let got = servers::read_to_end(&mut s).await;
            s.write_all(&reply).await.unwrap();
            s.shutdown().await.unwrap();
            got
        })
    };
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    path.wait_until_forwarding(&lb, 1).await;
    let client = async {
        c.write_all(&request).await.unwrap();
        c.shutdown().await.unwrap();
        servers::read_to_end(&mut c).await
    };
    let got_reply = timeout(BOUND, client).await.expect("client timed out");
    let got_request = timeout(BOUND, server).await.expect("server timed out").unwrap();
    assert!(
        got_request == request,
        "server got {} of {} request bytes",
        got_request.len(),
        request.len()
    );
    assert!(
        got_reply == reply,
        "client got {} of {} reply bytes",
        got_reply.len(),
        reply.len()
    );
    path.assert_bytes_path(&lb, (request.len() + reply.len()) as u64)
        .await;
}

/// The server speaks first and shuts down writing; the client sees EOF, replies, closes; the
/// server reads the whole reply and then EOF.
pub async fn half_close_server_first(path: Path) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = path.lb(&[l.local_addr().unwrap()]).spawn();
    let banner: Vec<u8> = (0..3_000_000u32).map(|i| (i % 239) as u8).collect();
    let reply: Vec<u8> = (0..2_000_000u32).map(|i| (i % 233) as u8).collect();
    let (go, ready) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let banner = banner.clone();
        tokio::spawn(async move {
            let mut s = servers::accept_one(&l).await;
            ready.await.unwrap();
            s.write_all(&banner).await.unwrap();
            s.shutdown().await.unwrap();
            servers::read_to_end(&mut s).await
        })
    };
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    path.wait_until_forwarding(&lb, 1).await;
    go.send(()).unwrap();
    let client = async {
        let got = servers::read_to_end(&mut c).await;
        c.write_all(&reply).await.unwrap();
        c.shutdown().await.unwrap();
        got
    };
    let got_banner = timeout(BOUND, client).await.expect("client timed out");
    let got_reply = timeout(BOUND, server).await.expect("server timed out").unwrap();
    assert!(
        got_banner == banner,
        "client got {} of {} banner bytes",
        got_banner.len(),
        banner.len()
    );
    assert!(
        got_reply == reply,
        "server got {} of {} reply bytes",
        got_reply.len(),
        reply.len()
    );
    path.assert_bytes_path(&lb, (banner.len() + reply.len()) as u64)
        .await;
}

/// A server that resets its connection: the client is reset too, promptly, and it is counted.
pub async fn reset_is_passed_on(path: Path) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = path.lb(&[l.local_addr().unwrap()]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut s = servers::accept_one(&l).await;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    // SO_LINGER 0 then close: the kernel sends RST instead of FIN.
    s.set_zero_linger().unwrap();
    drop(s);
    servers::expect_reset(&mut c, Duration::from_secs(10)).await;
    // The client's reset and the counter race: wait for the counter.
    lb.wait_for("the reset to be counted", |m| {
        m.value("lb_resets_total{listener=\"test\",side=\"server\"}") == Some(1.0)
    })
    .await;
}

/// A flow idle for longer than `timeouts.client` is closed and counted; one that keeps moving
/// bytes (more slowly than the timeout, in total longer than it) is not.
pub async fn idle_flows_time_out(path: Path) {
    let echo = servers::echo().await;
    let lb = path.lb(&[echo]).timeout("client", "600ms").spawn();
    // The active flow: one byte every 150 ms for 1.8 s, three times the timeout.
    let active = tokio::spawn({
        let addr = lb.listener;
        async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            for i in 0..12u8 {
                servers::echo_round_trip(&mut c, &[i]).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    });
    let mut idle = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut idle, b"x").await;
    let quiet_since = std::time::Instant::now();
    let mut rest = Vec::new();
    timeout(Duration::from_secs(10), idle.read_to_end(&mut rest))
        .await
        .expect("idle flow was not closed")
        .expect("idle flow should end with a clean close");
    let waited = quiet_since.elapsed();
    assert!(
        waited >= Duration::from_millis(550),
        "closed after {waited:?}, before the 600ms timeout"
    );
    active.await.expect("the active flow was cut");
    let m = lb.metrics();
    assert_eq!(
        m.get("lb_idle_timeouts_total{listener=\"test\",side=\"client\"}"),
        1.0,
        "{}",
        m.text
    );
}

/// The client half-closes, then resets: the server, still sending, is reset promptly (the
/// reset is noticed on a socket already past its end of stream).
pub async fn reset_after_half_close(path: Path) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = path.lb(&[l.local_addr().unwrap()]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    let mut s = servers::accept_one(&l).await;
    path.wait_until_forwarding(&lb, 1).await;
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(servers::read_to_end(&mut s).await, b"request");
    c.set_zero_linger().unwrap();
    drop(c);
    // The server keeps sending; within 10 s a write must fail with the passed-on reset.
    let started = std::time::Instant::now();
    let err = loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the server was not reset within 10 s"
        );
        if let Err(e) = s.write_all(&[0u8; 1024]).await {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{err}"
    );
    lb.wait_for("the reset to be counted", |m| {
        m.value("lb_resets_total{listener=\"test\",side=\"client\"}") == Some(1.0)
    })
    .await;
}

/// lb stops with a flow still open after the grace period: the flow is reset, not closed as
/// if it were complete.
pub async fn shutdown_resets_flows_left_after_the_grace_period(path: Path) {
    let echo = servers::echo().await;
    let mut lb = path.lb(&[echo]).timeout("shutdown_grace", "500ms").spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"x").await;
    let started = std::time::Instant::now();
    let status = lb
        .terminate(Duration::from_secs(10))
        .expect("lb did not exit after the grace period");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "lb exited before the grace period"
    );
    servers::expect_reset(&mut c, Duration::from_secs(5)).await;
    lb.wait_for_log("grace period over; closing 1 flow(s)").await;
}

/// A client that stops reading while the server still sends: its side idles out with bytes in
/// flight, and the flow is reset rather than closed as if complete.
pub async fn idle_timeout_with_bytes_in_flight_resets(path: Path) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = path
        .lb(&[l.local_addr().unwrap()])
        .timeout("client", "600ms")
        .spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    let mut s = servers::accept_one(&l).await;
    path.wait_until_forwarding(&lb, 1).await;
    // The server offers 64 MiB (writes end with an error once lb resets it); the client reads
    // nothing until lb gives up on it.
    let server = tokio::spawn(async move {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..64 {
            if s.write_all(&chunk).await.is_err() {
                break;
            }
        }
        s
    });
    lb.wait_for("the client side to time out", |m| {
        m.value("lb_idle_timeouts_total{listener=\"test\",side=\"client\"}") == Some(1.0)
    })
    .await;
    let mut sink = vec![0u8; 1 << 16];
    let err = loop {
        match timeout(Duration::from_secs(10), c.read(&mut sink))
            .await
            .expect("client read hung")
        {
            Ok(0) => panic!("the client saw a clean end of stream, not a reset"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    drop(
        timeout(Duration::from_secs(10), server)
            .await
            .expect("server hung"),
    );
}
