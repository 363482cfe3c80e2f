//! Kernel forwarding (BPF sockhash), end to end. Privileged: skips visibly without root, and
//! fails instead when LB_REQUIRE_BPF=1 (as in `.ci/run`).
use lb_tests::{bpf_available, scenarios::Path, servers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

lb_tests::forwarding_scenarios!(Path::Kernel, bpf_available);

/// The program's aya-log records reach lb's log: each end of stream arrives as a zero-length
/// skb, which the program drops and reports at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_log_messages_reach_the_daemon_log() {
    if !bpf_available("ebpf_log_messages_reach_the_daemon_log") {
        return;
    }
    let echo = servers::echo().await;
    let lb = Path::Kernel.lb(&[echo]).log_filter("debug").spawn();
    let mut c = tokio::net::TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"ping").await;
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    // The record travels through a ring buffer: poll the log (bounded).
    for _ in 0..100 {
        if lb.log().contains("zero-length skb (FIN) on socket cookie") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("no eBPF log record in lb's log:\n{}", lb.log());
}
