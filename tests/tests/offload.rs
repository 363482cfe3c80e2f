//! The hand-off from userspace to the kernel (`forwarding.offload_after`): short flows stay in
//! userspace, long ones move to the kernel mid-stream without losing or reordering a byte.
//! Privileged like kernel_path.rs. Sizes follow `LB_TEST_SCALE` (`lb_tests::scale`), for slow
//! emulated machines.
use lb_tests::{
    bpf_available,
    flows::{self, FlowSpec},
    lb::LbBuilder,
    scaled, servers,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::time::Duration;
use tokio::net::TcpStream;

const BOUND: Duration = Duration::from_secs(240);

/// Flows that move less than `offload_after` never enter the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_flows_stay_in_userspace() {
    if !bpf_available("short_flows_stay_in_userspace") {
        return;
    }
    let echo = servers::echo().await;
    let lb = LbBuilder::new(&[echo])
        .forwarding("kernel")
        .offload_after("64KiB")
        .spawn();
    for i in 0..20u8 {
        let mut c = TcpStream::connect(lb.listener).await.unwrap();
        servers::echo_round_trip(&mut c, &[i; 1024]).await;
    }
    // The copy loop counts a chunk after writing it: the client can have the echo first.
    let m = lb
        .wait_for("every copied byte counted", |m| {
            m.user_bytes() >= 2.0 * 20.0 * 1024.0
        })
        .await;
    assert_eq!(m.kernel_bytes(), 0.0, "{}", m.text);
    assert_eq!(m.user_bytes(), 2.0 * 20.0 * 1024.0, "{}", m.text);
    assert_eq!(m.get("lb_kernel_tracked_sockets"), 0.0, "{}", m.text);
    assert_eq!(m.sum("lb_kernel_fallbacks_total"), 0.0, "{}", m.text);
}

/// 100 flows sending 16 MiB each way at full speed through lbs whose `offload_after` is drawn
/// at random between 1 byte and 4 MiB (both divided by the scale): each flow is handed to the
/// kernel mid-stream, at an offset its own timing decides, and every byte arrives in order both
/// ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_handoffs_at_random_offsets_keep_every_byte() {
    if !bpf_available("mid_stream_handoffs_at_random_offsets_keep_every_byte") {
        return;
    }
    let size = scaled(16 << 20) as u64;
    let mut rng = SmallRng::seed_from_u64(100);
    let (server, mut reports) = servers::integrity().await;
    let (mut kernel, mut user, mut handoffs, mut fallbacks) = (0.0, 0.0, 0.0, 0.0);
    for round in 0..10u64 {
        let offload_after = rng.gen_range(1..=scaled(4 << 20) as u64);
        let lb = LbBuilder::new(&[server])
            .forwarding("kernel")
            .offload_after(&offload_after.to_string())
            .spawn();
        let specs: Vec<FlowSpec> = (0..10)
            .map(|i| FlowSpec {
                up: size,
                down: size,
                seed: 10_000 + round * 10 + i,
            })
            .collect();
        let tasks: Vec<_> = specs
            .iter()
            .map(|&spec| tokio::spawn(flows::run(lb.listener, spec)))
            .collect();
        let (clients, by_seed) = lb_tests::gather(tasks, &mut reports, |r| r.seed, BOUND).await;
        let m = lb.metrics();
        // Shown with a failure below: whether the program itself was handed bytes twice, and
        // how many repeated bytes it trimmed.
        eprintln!(
            "round {round}: lb_kernel_duplicated_bytes_total {}, lb_kernel_trimmed_bytes_total {}",
            m.get("lb_kernel_duplicated_bytes_total"),
            m.get("lb_kernel_trimmed_bytes_total")
        );
        for (spec, client) in specs.iter().zip(&clients) {
            flows::assert_intact(spec, client, &by_seed[&spec.seed]);
        }
        assert_eq!(m.get("lb_kernel_duplicated_bytes_total"), 0.0, "{}", m.text);
        assert_eq!(m.get("lb_kernel_untrimmed_segments_total"), 0.0, "{}", m.text);
        // A flow whose client had sent everything and half-closed by the time of the hand-off
        // cannot enter the kernel (only ESTABLISHED sockets can): it finishes in userspace.
        fallbacks += m.counted("lb_kernel_fallbacks_total{reason=\"ended\"}");
        assert_eq!(
            m.sum("lb_kernel_fallbacks_total"),
            m.counted("lb_kernel_fallbacks_total{reason=\"ended\"}"),
            "the BPF maps were full:\n{}",
            m.text
        );
        kernel += m.kernel_bytes();
        user += m.user_bytes();
        handoffs += m.get("lb_flow_handoffs_total{direction=\"user_to_kernel\"}");
    }
    eprintln!(
        "100 hand-offs: {kernel} kernel bytes, {user} user bytes, {handoffs} directions handed to the kernel, {fallbacks} flows finished in userspace"
    );
    assert!(
        kernel + user >= 100.0 * 2.0 * size as f64,
        "bytes missing from the counters"
    );
    // Each flow sends both ways, so a flow handed over hands over two directions.
    assert!(handoffs >= 150.0, "only {handoffs} directions reached the kernel");
    assert!(
        kernel > user,
        "most bytes should have been forwarded by the kernel"
    );
}
