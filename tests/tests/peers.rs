//! Peers that behave like real ones, not like lb's own fixtures, on both forwarding paths (the
//! kernel path with its default hand-off after `offload_after`, and userspace): a serial echo
//! server that does not read while it writes, a server that answers pipelined requests while
//! the client keeps sending, readers paced at 100 MB/s and 10 MB/s, both sides slow at once,
//! and hundreds of flows with random sizes and pauses. Every byte is checked (sha256 both
//! ways) and every flow must end within its transfer time plus a second: a flow that waits on
//! something that cannot happen shows here as a late or cut flow.
//!
//! The peers (`lb_tests::peers`, which `cargo xtask bench tcp` also runs) are plain blocking
//! sockets on threads, like the simple servers users run; the tests take turns (one lb at a
//! time) so that their timings are their own. Sizes, rates and time bounds follow
//! `LB_TEST_SCALE` (`lb_tests::scale`), for slow emulated machines.
use lb_tests::{
    bpf_available,
    lb::{Lb, LbBuilder},
    paced::{self, PacedSpec, Reading},
    peers::{self, answer, run_flows, serial_echo, server, stream_and_read},
    scaled, scaled_rate, slack,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Mutex},
    time::Duration,
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
        // left to the test's bound. The brake's bound (16 MiB by default) shrinks with the
        // transfers, so that slow readers still meet it.
        let b = LbBuilder::new(servers)
            .timeout("client", "20s")
            .backend_timeout("server", "20s")
            .set("flow_control", "max_in_flight", &max_in_flight().to_string());
        match self {
            Mode::Kernel => b.arg("--forwarding").arg("kernel"),
            Mode::User => b.arg("--forwarding").arg("user"),
        }
        .spawn()
    }
}

/// `flow_control.max_in_flight`: the default, 16 MiB, divided by the scale (256 KiB at least).
fn max_in_flight() -> usize {
    scaled(16 << 20).max(256 << 10)
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

#[test]
fn a_serial_echo_server_never_stalls_a_flow() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const FLOWS: usize = 12;
    let size = scaled(16 << 20);
    let echo = server(serial_echo);
    for mode in Mode::available("a_serial_echo_server_never_stalls_a_flow") {
        let lb = mode.lb(&[echo]);
        for round in 0..3u64 {
            let took = run_flows(FLOWS, |i| {
                peers::echo_flow(lb.listener, round * 100 + i as u64, size)
                    .unwrap_or_else(|e| panic!("{mode:?} round {round}: {e}"))
            });
            let slowest = took.iter().max().unwrap();
            // Unpaced: far less than this, unless a flow waited for its idle timeout.
            assert!(
                *slowest < slack(Duration::from_secs(15)),
                "{mode:?} round {round}: a flow took {slowest:?}"
            );
        }
        check_share(mode, &lb, "serial echo");
    }
}

#[test]
fn a_server_answers_pipelined_requests_while_the_client_sends() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let requests = scaled(16 * 1024);
    let addr = server(answer);
    for mode in Mode::available("a_server_answers_pipelined_requests_while_the_client_sends") {
        let lb = mode.lb(&[addr]);
        run_flows(4, |i| {
            let took = peers::answer_flow(lb.listener, 7 + i as u64, requests)
                .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            assert!(
                took < slack(Duration::from_secs(15)),
                "{mode:?} flow {i} took {took:?}"
            );
        });
        check_share(mode, &lb, "pipelined requests");
    }
}

/// One flow against [`peers::stream_and_read`] through `lb`; fails the test if its bytes
/// differ either way.
fn streamed(lb: &Lb, seed: u64, down: usize, up: usize, client_rate: f64, server_rate: f64) -> Duration {
    peers::streamed(lb.listener, seed, down, up, client_rate, server_rate).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn paced_readers_get_the_stream_within_its_time() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let addr = server(stream_and_read);
    for mode in Mode::available("paced_readers_get_the_stream_within_its_time") {
        let lb = mode.lb(&[addr]);
        for (rate, size) in [(100e6, 96usize << 20), (10e6, 12 << 20)] {
            let (rate, size) = (scaled_rate(rate), scaled(size));
            let took = run_flows(2, |i| streamed(&lb, i as u64, size, 0, rate, 0.0));
            let due = Duration::from_secs_f64(size as f64 / rate) + slack(Duration::from_secs(1));
            for t in took {
                assert!(
                    t <= due,
                    "{mode:?}: a reader paced at {rate} B/s took {t:?} for {size} bytes"
                );
            }
        }
        check_share(mode, &lb, "paced readers");
        if mode == Mode::Kernel {
            // A slow reader brakes its direction; what lb then held for it stays within the
            // bound plus what a brake holds on the sender's socket.
            let most = lb.metrics().get("lb_flow_most_in_flight_bytes");
            assert!(
                most > 0.0 && most <= 2.0 * max_in_flight() as f64,
                "lb_flow_most_in_flight_bytes {most}"
            );
        }
    }
}

#[test]
fn both_sides_slow_at_once() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let addr = server(stream_and_read);
    for mode in Mode::available("both_sides_slow_at_once") {
        let lb = mode.lb(&[addr]);
        let (size, rate) = (scaled(24 << 20), scaled_rate(20e6));
        let took = run_flows(2, |i| streamed(&lb, 10 + i as u64, size, size, rate, rate));
        let due = Duration::from_secs_f64(size as f64 / rate) + slack(Duration::from_secs(1));
        for t in took {
            assert!(
                t <= due,
                "{mode:?}: a flow with both sides at {rate} B/s took {t:?}"
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
        let l = lb_tests::servers::listener();
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
            // Hundreds still: a smaller scale shrinks the flows, not their number.
            let (up, down) = (scaled(1 << 20) as u64, scaled(2 << 20) as u64);
            let specs: Vec<PacedSpec> = (0..300u64)
                .map(|seed| PacedSpec {
                    up: rng.gen_range(0..up),
                    down: rng.gen_range(0..down),
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
                lb_tests::gather(tasks, &mut reports, |r| r.0, slack(Duration::from_secs(120))).await;
            for (spec, client) in specs.iter().zip(&clients) {
                paced::assert_intact(spec, client, &by_seed[&spec.seed].1);
            }
        }
    });
}
