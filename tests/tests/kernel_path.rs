//! Kernel forwarding (BPF sockhash), end to end. Privileged: skips visibly without root, and
//! fails instead when LB_REQUIRE_BPF=1 (as in `.ci/run`).
use lb_tests::{
    bpf_available,
    scenarios::{self, Path},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_transfer_both_ways_is_intact_and_kernel_forwarded() {
    if bpf_available("big_transfer_both_ways_is_intact_and_kernel_forwarded") {
        scenarios::big_transfer(Path::Kernel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_flows_are_intact() {
    if bpf_available("many_concurrent_flows_are_intact") {
        scenarios::many_flows(Path::Kernel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_do_not_stall() {
    if bpf_available("early_bytes_do_not_stall") {
        scenarios::early_bytes_do_not_stall(Path::Kernel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_first() {
    if bpf_available("half_close_client_first") {
        scenarios::half_close_client_first(Path::Kernel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_server_first() {
    if bpf_available("half_close_server_first") {
        scenarios::half_close_server_first(Path::Kernel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_passed_on() {
    if bpf_available("reset_is_passed_on") {
        scenarios::reset_is_passed_on(Path::Kernel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_time_out() {
    if bpf_available("idle_flows_time_out") {
        scenarios::idle_flows_time_out(Path::Kernel).await;
    }
}

/// The program's aya-log records reach lb's log: each end of stream arrives as a zero-length
/// skb, which the program drops and reports at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_log_messages_reach_the_daemon_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !bpf_available("ebpf_log_messages_reach_the_daemon_log") {
        return;
    }
    let echo = lb_tests::servers::echo().await;
    let lb = Path::Kernel.lb(&[echo]).log_filter("debug").spawn();
    let mut c = tokio::net::TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).await.unwrap();
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
