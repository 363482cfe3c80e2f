//! Binary upgrades: `lb upgrade` and SIGUSR2 start a new lb process that takes over the
//! listening sockets (no connection refused while it does), while the old one finishes its
//! flows and exits; a new process that cannot start leaves the old one as it was.
use lb_tests::{
    bpf_available,
    lb::{lb_binary, process_alive, Lb, LbBuilder, Successors},
    servers,
};
use std::{net::SocketAddr, process::Output, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// Runs `lb ARGS --admin ADDR` (bounded at 60 s).
async fn lb_cmd(admin: SocketAddr, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(lb_binary())
        .args(args)
        .args(["--admin", &admin.to_string()])
        .output();
    timeout(Duration::from_secs(60), run)
        .await
        .expect("lb command timed out")
        .expect("cannot run lb")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `lb upgrade`, which must succeed: the new process's pid.
async fn upgrade(admin: SocketAddr, successors: &mut Successors) -> u32 {
    let out = lb_cmd(admin, &["upgrade"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "upgrade failed: {stderr}");
    let pid: u32 = stdout
        .strip_prefix("upgraded: pid ")
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    successors.0.push(pid);
    pid
}

/// The process answering on the admin endpoint: its pid and its `/stats.json`.
async fn serving(admin: SocketAddr) -> (u32, serde_json::Value) {
    let out = lb_cmd(admin, &["stats", "--json"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    (v["process"]["pid"].as_u64().unwrap() as u32, v)
}

/// One connection: a byte echoed.
async fn echo_once(addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"x").await.map_err(|e| format!("write: {e}"))?;
        let mut back = [0u8; 1];
        s.read_exact(&mut back).await.map_err(|e| format!("echo: {e}"))?;
        Ok::<_, String>(())
    };
    timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upgrades_in_a_row_refuse_no_connection_and_old_processes_finish_their_flows() {
    let kernel =
        bpf_available("two_upgrades_in_a_row_refuse_no_connection_and_old_processes_finish_their_flows");
    let echo = servers::echo().await;
    let mut lb = LbBuilder::new(&[echo])
        .forwarding(if kernel { "kernel" } else { "user" })
        .offload_after("0")
        .spawn();
    let (listener, admin, first) = (lb.listener, lb.admin, lb.pid());
    let mut successors = Successors(Vec::new());
    // A flow the first process keeps.
    let mut kept = TcpStream::connect(listener).await.unwrap();
    servers::echo_round_trip(&mut kept, b"before").await;
    // A connect loop through both upgrades.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let connects = tokio::spawn({
        let done = done.clone();
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for _ in 0..100_000 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match echo_once(listener).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }
    });

    let second = upgrade(admin, &mut successors).await;
    assert_ne!(second, first);
    let (pid, stats) = serving(admin).await;
    assert_eq!(pid, second, "the new process answers on the admin endpoint");
    let detail = stats["process"]["last_upgrade"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(detail.contains(&format!("upgrade of pid {first}")), "{stats}");
    // A kernel flow moves with the process, and the old one, left with none, exits at once;
    // a userspace flow stays in the old process, which exits once it ends.
    if kernel {
        assert!(
            lb.exited_within(lb_tests::slack(Duration::from_secs(1)))
                .await
                .is_some(),
            "the old process was still there 1 s after the upgrade, with its flow in the kernel"
        );
        servers::echo_round_trip(&mut kept, b"moved").await;
    } else {
        servers::echo_round_trip(&mut kept, b"during").await;
        assert!(process_alive(first), "the old process left before its flow ended");
        drop(kept);
        assert!(
            lb.exited_within(Duration::from_secs(10)).await.is_some(),
            "the old process did not exit once its flow ended"
        );
        kept = TcpStream::connect(listener).await.unwrap();
    }

    // Another, from the second process.
    servers::echo_round_trip(&mut kept, b"on the second").await;
    let third = upgrade(admin, &mut successors).await;
    assert_eq!(serving(admin).await.0, third);
    servers::echo_round_trip(&mut kept, b"after the second").await;
    drop(kept);
    let mut gone = false;
    for _ in 0..500 {
        if !process_alive(second) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the second process did not exit");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = connects.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} connection(s) failed: {failed:?}",
        failed.len()
    );
    assert!(ok > 10, "{ok} connections");
    eprintln!("two upgrades: {ok} connections, none failed");
}

#[tokio::test]
async fn a_new_process_that_cannot_start_leaves_lb_as_it_was() {
    let echo = servers::echo().await;
    let lb: Lb = LbBuilder::new(&[echo]).spawn();
    let first = lb.pid();
    // No such binary.
    let out = lb_cmd(lb.admin, &["upgrade", "--binary", "/nonexistent/lb"]).await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot start /nonexistent/lb"), "{stderr}");
    // A file the new process refuses: its errors, at their position.
    let path = lb.dir().join("lb.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("listeners:", "listeners:\n  colour: blue")).unwrap();
    let out = lb_cmd(lb.admin, &["upgrade"]).await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the new process could not start")
            && stderr.contains(&format!("{}:", path.display())),
        "{stderr}"
    );
    // The same process serves, and says how the upgrade went.
    let (pid, stats) = serving(lb.admin).await;
    assert_eq!(pid, first);
    assert_eq!(stats["process"]["last_upgrade"]["result"], "failed", "{stats}");
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"still here").await;
}

/// Kernel flows carrying sha256-checked bytes both ways, with slow readers: they move to the new
/// process in the middle of their transfers (held bytes, throttles and all), twice, and every
/// byte arrives once and in order; each old process exits within a second. Then an upgrade that
/// fails (no such binary) brings them back to the process they were in, still intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_flows_move_to_the_new_process_intact() {
    if !bpf_available("kernel_flows_move_to_the_new_process_intact") {
        return;
    }
    use lb_tests::paced::{self, PacedSpec, Reading};
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let server = paced::serve_into(tx);
    let mut lb = LbBuilder::new(&[server])
        .forwarding("kernel")
        .offload_after("0")
        .spawn();
    let (listener, admin) = (lb.listener, lb.admin);
    let mut successors = Successors(Vec::new());
    // Half the flows read nothing for their first 4 s (their bytes are braked and held
    // through the upgrades), half read in bursts with pauses; 24 MiB each way.
    let specs: Vec<PacedSpec> = (0..40u64)
        .map(|seed| {
            let reading = Reading {
                stall_ms: if seed % 2 == 0 { 4000 } else { 0 },
                burst: (16 << 10, 256 << 10),
                pause_ms: (1, 10),
            };
            // (The stalled flows are not scaled: smaller, they would fit in the sockets'
            // buffers, and lb would be done with them before their reader wakes.)
            let size = if seed % 2 == 0 {
                24 << 20
            } else {
                lb_tests::scaled(24 << 20) as u64
            };
            PacedSpec {
                up: size,
                down: size,
                seed: 7000 + seed,
                client_reads: reading,
                server_reads: reading,
            }
        })
        .collect();
    let flows: Vec<_> = specs
        .iter()
        .map(|&spec| {
            tokio::spawn(async move {
                paced::run_client(listener, spec, &std::sync::atomic::AtomicU64::new(0)).await
            })
        })
        .collect();
    // Under way, in the kernel (the half that does not read yet, at least).
    lb.wait_for("20 kernel flows", |m| m.get("lb_kernel_flows") >= 20.0)
        .await;
    let first = lb.pid();
    let second = upgrade(admin, &mut successors).await;
    assert!(
        lb.exited_within(lb_tests::slack(Duration::from_secs(1)))
            .await
            .is_some(),
        "the old process was still there 1 s after the upgrade"
    );
    let (_, stats) = serving(admin).await;
    let detail = stats["process"]["last_upgrade"]["detail"]
        .as_str()
        .unwrap_or_default();
    let moved: u32 = detail
        .strip_prefix(&format!("started by an upgrade of pid {first}, "))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(moved >= 20, "{stats}");
    // Still under way at the next upgrade.
    let m = lb.metrics();
    assert!(
        m.get("lb_kernel_flows") >= 10.0,
        "the flows ended too soon: {}",
        m.text
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = upgrade(admin, &mut successors).await;
    let mut gone = false;
    for _ in 0..50 * lb_tests::scale() {
        if !process_alive(second) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the second process was still there 1 s after the upgrade");
    // An upgrade whose new process fails after it took the maps and the flows over (a
    // listener it cannot bind): the flows come back, still under way.
    let flowing = lb.metrics().get("lb_kernel_flows");
    assert!(flowing >= 10.0, "the flows ended too soon: {flowing}");
    let path = lb.dir().join("lb.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    let taken =
        format!("  - name: taken\n    bind: \"{admin}\"\n    mode: tcp\n    backend: pool\nbackends:");
    std::fs::write(&path, good.replacen("backends:", &taken, 1)).unwrap();
    let out = lb_cmd(admin, &["upgrade"]).await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "the upgrade went through");
    assert!(stderr.contains("listener `taken`: cannot listen on"), "{stderr}");
    std::fs::write(&path, good).unwrap();
    assert_eq!(serving(admin).await.0, third);
    let (clients, by_seed) = lb_tests::gather(flows, &mut reports, |r| r.0, Duration::from_secs(120)).await;
    for (spec, client) in specs.iter().zip(&clients) {
        paced::assert_intact(spec, client, &by_seed[&spec.seed].1);
    }
    eprintln!(
        "40 kernel flows of up to {} MiB each way moved twice (and back once), intact; {} bytes held",
        24,
        lb.metrics().get("lb_flow_held_bytes_total")
    );
}

/// A new binary whose eBPF program or map layout differs (`lb abi`) cannot take the kernel
/// flows over: it loads its own program and serves new connections, while the old process
/// keeps its kernel flows (still forwarded by its own program) and exits once they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_with_another_ebpf_program_leaves_the_kernel_flows_where_they_are() {
    if !bpf_available("a_binary_with_another_ebpf_program_leaves_the_kernel_flows_where_they_are") {
        return;
    }
    flows_stay_in_the_old_process(true).await;
}

/// `tune.upgrade_moves_kernel_flows: false`: an upgrade leaves the kernel flows in the old
/// process, as a binary with another program does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_flows_stay_when_moving_is_off() {
    if !bpf_available("kernel_flows_stay_when_moving_is_off") {
        return;
    }
    flows_stay_in_the_old_process(false).await;
}

/// Upgrades a kernel-path lb with one echo flow under way, to a binary with another eBPF
/// program (`another_program`), else with the move turned off: the flow stays in the old
/// process, which exits once it ends, and the new process serves new flows.
async fn flows_stay_in_the_old_process(another_program: bool) {
    let echo = servers::echo().await;
    let moves = if another_program { "true" } else { "false" };
    let mut lb = LbBuilder::new(&[echo])
        .forwarding("kernel")
        .offload_after("0")
        .set("tune", "upgrade_moves_kernel_flows", moves)
        .spawn();
    let mut successors = Successors(Vec::new());
    let mut kept = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut kept, b"before").await;
    lb.wait_for("the flow in the kernel", |m| m.get("lb_kernel_flows") >= 1.0)
        .await;
    let mut args = vec!["upgrade".to_string()];
    if another_program {
        // The same lb, but answering `lb abi` with another program's.
        let other = lb.dir().join("other-lb");
        std::fs::write(
            &other,
            format!(
                "#!/bin/sh\nif [ \"$1\" = abi ]; then echo another; exit 0; fi\nexec {} \"$@\"\n",
                lb_binary().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
        args.extend(["--binary".to_string(), other.to_str().unwrap().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lb_cmd(lb.admin, &args).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let new: u32 = stdout
        .strip_prefix("upgraded: pid ")
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    successors.0.push(new);
    let (_, stats) = serving(lb.admin).await;
    let detail = stats["process"]["last_upgrade"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(detail.contains("0 kernel flow(s) moved in"), "{stats}");
    // The old process forwards its flow still, in the kernel, and stays for it.
    servers::echo_round_trip(&mut kept, b"still in the old process").await;
    assert!(lb.exited_within(Duration::from_millis(300)).await.is_none());
    // The new one forwards new flows with its own program.
    let mut fresh = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut fresh, b"in the new process").await;
    drop(kept);
    assert!(
        lb.exited_within(lb_tests::slack(Duration::from_secs(10)))
            .await
            .is_some(),
        "the old process did not exit once its flow ended"
    );
    servers::echo_round_trip(&mut fresh, b"after the old process left").await;
}

/// Flows moved in by an upgrade take their listener's `maxconn` slots in the new process: with
/// `maxconn: 2` and two kernel flows moved, a third client waits until one of them ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_flows_count_against_the_listener_maxconn() {
    if !bpf_available("moved_flows_count_against_the_listener_maxconn") {
        return;
    }
    let echo = servers::echo().await;
    let lb = LbBuilder::new(&[echo])
        .forwarding("kernel")
        .offload_after("0")
        .listener_yaml("    maxconn: 2\n")
        .spawn();
    let mut successors = Successors(Vec::new());
    let mut first = TcpStream::connect(lb.listener).await.unwrap();
    let mut second = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut first, b"one").await;
    servers::echo_round_trip(&mut second, b"two").await;
    lb.wait_for("both flows in the kernel", |m| m.get("lb_kernel_flows") >= 2.0)
        .await;
    let pid = upgrade(lb.admin, &mut successors).await;
    let (_, stats) = serving(lb.admin).await;
    let detail = stats["process"]["last_upgrade"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(detail.contains(" 2 kernel flow(s) moved in"), "{stats}");
    servers::echo_round_trip(&mut first, b"moved").await;
    // The new process has no slot left: the third client's bytes wait unserved.
    let mut third = TcpStream::connect(lb.listener).await.unwrap();
    third.write_all(b"three").await.unwrap();
    let mut buf = [0u8; 5];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read_exact(&mut buf)).await;
    assert!(early.is_err(), "served beyond maxconn 2 in process {pid}");
    // One moved flow ends: its slot serves the third.
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), third.read_exact(&mut buf))
        .await
        .expect("the third client was not served once a moved flow ended")
        .unwrap();
    assert_eq!(&buf, b"three");
    servers::echo_round_trip(&mut second, b"still moved").await;
}

/// The process an upgrade started shows the eBPF program's log records (it took the program
/// over without the old process's handle to its log buffer): once the old one has left, a
/// kernel flow's end (the program drops its bare FIN, at debug level) is in the log again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_process_shows_the_programs_log_records() {
    if !bpf_available("the_new_process_shows_the_programs_log_records") {
        return;
    }
    const RECORD: &str = "zero-length skb (FIN) on socket cookie";
    let echo = servers::echo().await;
    let mut lb = LbBuilder::new(&[echo])
        .forwarding("kernel")
        .offload_after("0")
        .log_filter("info,lb_ebpf=debug")
        .set("tune", "upgrade_moves_kernel_flows", "true")
        .spawn();
    let mut successors = Successors(Vec::new());
    upgrade(lb.admin, &mut successors).await;
    assert!(
        lb.exited_within(lb_tests::slack(Duration::from_secs(1)))
            .await
            .is_some(),
        "the old process was still there 1 s after the upgrade"
    );
    let before = lb.log().matches(RECORD).count();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"a flow in the new process").await;
    lb.wait_for("the flow in the kernel", |m| m.get("lb_kernel_flows") >= 1.0)
        .await;
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    for _ in 0..250 {
        if lb.log().matches(RECORD).count() > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no program log record from the new process:\n{}", lb.log());
}

/// SIGUSR2 upgrades as `lb upgrade` does.
#[tokio::test]
async fn sigusr2_upgrades() {
    let echo = servers::echo().await;
    let lb = LbBuilder::new(&[echo]).spawn();
    let mut successors = Successors(Vec::new());
    // SAFETY: a plain signal to the child's pid.
    assert_eq!(unsafe { libc::kill(lb.pid() as i32, libc::SIGUSR2) }, 0);
    lb.wait_for_log("SIGUSR2: pid ").await;
    let (pid, _) = serving(lb.admin).await;
    successors.0.push(pid);
    assert_ne!(pid, lb.pid());
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"after SIGUSR2").await;
}
