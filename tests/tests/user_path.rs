//! Userspace forwarding (`--forwarding user`), end to end: the same contract as the kernel
//! path. Needs no privilege.
use lb_tests::scenarios::{self, Path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_transfer_both_ways_is_intact_and_user_forwarded() {
    scenarios::big_transfer(Path::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_flows_are_intact() {
    scenarios::many_flows(Path::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_do_not_stall() {
    scenarios::early_bytes_do_not_stall(Path::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_first() {
    scenarios::half_close_client_first(Path::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_server_first() {
    scenarios::half_close_server_first(Path::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_passed_on() {
    scenarios::reset_is_passed_on(Path::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_time_out() {
    scenarios::idle_flows_time_out(Path::User).await;
}
