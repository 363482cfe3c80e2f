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
    // The record travels through a ring buffer, then lb's log.
    lb.wait_for_log("zero-length skb (FIN) on socket cookie").await;
}

/// A server that speaks first while lb is between its two inserts (widened to 300 ms by a
/// fault-injection knob): its bytes miss the map, the program keeps passing that socket's bytes
/// and lb copies them itself. Every byte arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_miss_the_map_stay_in_order() {
    use tokio::io::AsyncWriteExt;
    if !bpf_available("bytes_that_miss_the_map_stay_in_order") {
        return;
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = Path::Kernel
        .lb(&[l.local_addr().unwrap()])
        .env("LB_TEST_INSERT_GAP_MS", "300")
        .spawn();
    let banner: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let server = {
        let banner = banner.clone();
        tokio::spawn(async move {
            let mut s = servers::accept_one(&l).await;
            // Small paced writes for 0.8 s, so segments are still arriving (the receive window
            // is open) while lb sits between its inserts; then the bulk.
            let (paced, bulk) = banner.split_at(40 * 1024);
            for chunk in paced.chunks(1024) {
                s.write_all(chunk).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            s.write_all(bulk).await.unwrap();
            s.shutdown().await.unwrap();
            servers::read_to_end(&mut s).await
        })
    };
    let mut c = tokio::net::TcpStream::connect(lb.listener).await.unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(60), servers::read_to_end(&mut c))
        .await
        .expect("client timed out");
    assert!(
        got == banner,
        "client got {} of {} bytes, or out of order",
        got.len(),
        banner.len()
    );
    c.write_all(b"bye").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), b"bye");
    // The daemon counts the bytes it copied after writing them: the peer can have them first.
    let m = lb
        .wait_for("the held bytes counted", |m| m.user_bytes() > 0.0)
        .await;
    assert!(
        m.get("lb_kernel_misses_total") >= 1.0,
        "no miss happened: the test did not test:\n{}",
        m.text
    );
}

/// `tune.kernel_congestion`: both of lb's sockets of a kernel flow use the named congestion
/// control (reno, which every kernel has, or cubic where reno is the system's), as `ss`
/// shows; a name the kernel lacks stops lb at start, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_flows_use_the_configured_congestion_control() {
    if !bpf_available("kernel_flows_use_the_configured_congestion_control")
        || !lb_tests::program_available("kernel_flows_use_the_configured_congestion_control", "ss")
    {
        return;
    }
    // Not the system's: a flow whose sockets kept theirs must fail the check.
    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    let cc = if system.trim() == "reno" { "cubic" } else { "reno" };
    let echo = servers::echo().await;
    let lb = Path::Kernel
        .lb(&[echo])
        .set("tune", "kernel_congestion", cc)
        .spawn();
    assert!(
        lb.log()
            .contains(&format!("kernel flows use the {cc} congestion control")),
        "{}",
        lb.log()
    );
    let mut c = tokio::net::TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"ping").await;
    Path::Kernel.wait_until_forwarding(&lb, 1).await;
    let client_port = c.local_addr().unwrap().port();
    // lb's two sockets of the flow: the one the client reached, and the one to the server.
    let ss = |filter: String| {
        let out = std::process::Command::new("ss")
            .args(["-tinH", "state", "established", &filter])
            .output()
            .expect("running ss");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let lb_client_side = ss(format!(
        "( sport = :{} and dport = :{client_port} )",
        lb.listener.port()
    ));
    let lb_server_side = ss(format!("( dport = :{} )", echo.port()));
    for (side, out) in [("client", &lb_client_side), ("server", &lb_server_side)] {
        assert!(
            out.contains(&format!(" {cc} ")),
            "lb's {side} side is not on {cc}:\n{out}"
        );
    }
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();

    let err = Path::Kernel
        .lb(&[echo])
        .set("tune", "kernel_congestion", "no_such_cc")
        .try_spawn()
        .err()
        .expect("lb started with a congestion control the kernel lacks");
    assert!(
        err.contains("tune.kernel_congestion: the kernel has no `no_such_cc` congestion control"),
        "{err}"
    );
}

/// A client that resets while lb hands its flow to the kernel (between the two SOCKHASH
/// inserts, widened to 3 s by a fault-injection knob): the kernel refuses to insert its now
/// closed socket (EOPNOTSUPP), and the fallback is counted as `ended`, not as a full map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_during_the_hand_off_is_counted_as_ended_not_map_full() {
    if !bpf_available("a_reset_during_the_hand_off_is_counted_as_ended_not_map_full") {
        return;
    }
    let echo = servers::echo().await;
    let lb = Path::Kernel
        .lb(&[echo])
        .env("LB_TEST_INSERT_GAP_MS", "3000")
        .log_filter("info,lb::forward=debug")
        .spawn();
    let c = tokio::net::TcpStream::connect(lb.listener).await.unwrap();
    // Both sockets have their control slots: past the state check, at the inserts (the
    // second one comes 3 s after the first).
    lb.wait_for("the hand-off to be under way", |m| {
        m.get("lb_kernel_tracked_sockets") == 2.0
    })
    .await;
    c.set_zero_linger().unwrap();
    drop(c);
    let m = lb
        .wait_for("the fallback to be counted", |m| {
            m.sum("lb_kernel_fallbacks_total") >= 1.0
        })
        .await;
    assert_eq!(
        m.counted("lb_kernel_fallbacks_total{reason=\"ended\"}"),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(m.counted("lb_kernel_fallbacks_total{reason=\"map_full\"}"), 0.0);
    assert!(
        lb.log()
            .contains("flow stays in userspace (ended): SOCKHASH insert of the client socket failed"),
        "{}",
        lb.log()
    );
}
