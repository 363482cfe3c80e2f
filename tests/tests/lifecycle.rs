//! Failures around a flow and lb's own life: unreachable servers, the forwarding choice when BPF
//! cannot be used, graceful shutdown, and leaks.
use lb_tests::{
    bpf_available,
    lb::{lb_binary, spawn_command, LbBuilder},
    servers,
};
use std::{
    os::unix::fs::PermissionsExt,
    process::Command,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// Reads until the connection ends; Ok(bytes) on a clean close, Err on a reset.
async fn read_until_closed(c: &mut TcpStream, bound: Duration) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    timeout(bound, c.read_to_end(&mut v))
        .await
        .expect("client connection was not closed in time")?;
    Ok(v)
}

/// The one server's connect error was counted, and the log says why.
async fn assert_connect_error_counted(lb: &lb_tests::lb::Lb, why: &str) {
    let m = lb.metrics();
    let errors = m.get("lb_backend_connect_errors_total{backend=\"pool\",server=\"s0\"}");
    assert_eq!(errors, 1.0, "{}", m.text);
    lb.wait_for_log(why).await;
}

#[tokio::test]
async fn refused_server_closes_the_client_and_is_counted() {
    let refusing = servers::refusing().await;
    let lb = LbBuilder::new(&[refusing]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    let _ = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert_connect_error_counted(&lb, "Connection refused").await;
}

#[tokio::test]
async fn connect_timeout_is_honoured() {
    let hole = servers::black_hole().await;
    let lb = LbBuilder::new(&[hole.addr])
        .backend_timeout("connect", "400ms")
        .spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    let started = Instant::now();
    let _ = read_until_closed(&mut c, Duration::from_secs(10)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(350),
        "client closed after {waited:?}, before the connect timeout"
    );
    assert_connect_error_counted(&lb, "did not accept within 400ms").await;
}

/// Runs lb as an unprivileged user (nobody, no capabilities), so BPF cannot be loaded.
fn unprivileged_lb(builder: LbBuilder) -> Result<lb_tests::lb::Lb, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("lb.yaml");
    std::fs::write(&path, builder.config_text()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(lb_binary())
    .args(["run", "-c"])
    .arg(&path);
    spawn_command(cmd, dir)
}

#[tokio::test]
async fn kernel_forwarding_refuses_to_start_without_bpf() {
    if !bpf_available("kernel_forwarding_refuses_to_start_without_bpf (needs root to drop privileges)") {
        return;
    }
    let echo = servers::echo().await;
    let err = unprivileged_lb(LbBuilder::new(&[echo]).forwarding("kernel"))
        .err()
        .expect("lb started in kernel mode without BPF");
    assert!(
        err.contains("forwarding: kernel was requested but BPF cannot be used"),
        "{err}"
    );
}

#[tokio::test]
async fn auto_forwarding_falls_back_to_userspace_with_one_warning() {
    if !bpf_available(
        "auto_forwarding_falls_back_to_userspace_with_one_warning (needs root to drop privileges)",
    ) {
        return;
    }
    let echo = servers::echo().await;
    let lb = unprivileged_lb(LbBuilder::new(&[echo]).forwarding("auto")).expect("lb did not start");
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"ping").await;
    let log = lb.log();
    assert_eq!(
        log.matches("kernel forwarding unavailable, forwarding in userspace")
            .count(),
        1,
        "{log}"
    );
    // The copy loop counts a chunk after writing it: the client can have the echo first.
    let m = lb
        .wait_for("the echoed bytes counted", |m| m.user_bytes() >= 8.0)
        .await;
    assert_eq!(m.get("lb_kernel_forwarding"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_flows_leave_no_map_entries_or_fds() {
    if !bpf_available("closed_flows_leave_no_map_entries_or_fds") {
        return;
    }
    let echo = servers::echo().await;
    let lb = LbBuilder::new(&[echo])
        .forwarding("kernel")
        .offload_after("0")
        .spawn();
    // The baseline is taken with no admin connection open: a scrape's server-side socket
    // closes a moment after its response, so settle on the lowest of a few readings.
    let _ = lb.metrics();
    let mut fds_before = lb.open_fds();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(20));
        fds_before = fds_before.min(lb.open_fds());
    }
    let mut flows = Vec::new();
    for i in 0..50u8 {
        let mut c = TcpStream::connect(lb.listener).await.unwrap();
        servers::echo_round_trip(&mut c, &[i; 1000]).await;
        flows.push(c);
    }
    lb.wait_for("50 kernel flows", |m| {
        m.value("lb_kernel_flows") == Some(50.0) && m.get("lb_kernel_tracked_sockets") == 100.0
    })
    .await;
    drop(flows);
    lb.wait_for("all flows closed", |m| {
        m.value("lb_active_connections{listener=\"test\"}") == Some(0.0)
    })
    .await;
    let m = lb.metrics();
    assert_eq!(m.get("lb_kernel_tracked_sockets"), 0.0, "{}", m.text);
    // The last scrape's connection closes a moment after its response: poll (bounded).
    for _ in 0..100 {
        if lb.open_fds() <= fds_before {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("lb holds {} fds, {fds_before} before the flows", lb.open_fds());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_flows_finish_then_exits() {
    let echo = servers::echo().await;
    let mut lb = LbBuilder::new(&[echo]).timeout("shutdown_grace", "20s").spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"before").await;
    let listener = lb.listener;
    // SIGTERM without waiting for the exit: the flow is still open.
    assert!(
        lb.terminate(Duration::from_millis(300)).is_none(),
        "lb exited with a flow open"
    );
    // New connections are refused once lb stopped accepting.
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(listener).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "lb still accepts after SIGTERM");
    // The admin endpoint still answers while the flow drains.
    assert_eq!(lb.metrics().get("lb_active_connections{listener=\"test\"}"), 1.0);
    // The open flow keeps working during the grace period.
    servers::echo_round_trip(&mut c, b"after!").await;
    c.shutdown().await.unwrap();
    let rest = read_until_closed(&mut c, Duration::from_secs(10)).await.unwrap();
    assert!(rest.is_empty());
    let status = lb
        .terminate(Duration::from_secs(10))
        .expect("lb did not exit after its last flow closed");
    assert!(status.success(), "{status}");
}

/// The CPUs a thread may run on, from its `status` file (`Cpus_allowed_list: 0-2,4`).
fn cpus_allowed(status_path: &str) -> Vec<usize> {
    let status = std::fs::read_to_string(status_path).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    list.split(',')
        .flat_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()
        })
        .collect()
}

/// Each `lb-worker-N` thread of a running lb and the CPUs it may run on, by N.
fn worker_cpus(pid: u32) -> Vec<Vec<usize>> {
    let mut workers: Vec<(usize, Vec<usize>)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let dir = t.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
            let n = comm.trim().strip_prefix("lb-worker-")?.parse().unwrap();
            Some((n, cpus_allowed(dir.join("status").to_str().unwrap())))
        })
        .collect();
    workers.sort();
    workers.into_iter().map(|(_, cpus)| cpus).collect()
}

#[tokio::test]
async fn session_threads_are_bound_to_cpus_as_configured() {
    let echo = servers::echo().await;
    let allowed = cpus_allowed("/proc/self/status");
    let threads = allowed.len().to_string();
    // Default (auto), one thread per CPU lb may run on: thread i on the i-th CPU.
    let lb = LbBuilder::new(&[echo]).set("tune", "threads", &threads).spawn();
    let want: Vec<Vec<usize>> = allowed.iter().map(|&c| vec![c]).collect();
    assert_eq!(worker_cpus(lb.pid()), want);
    // Not one thread per CPU: auto binds none.
    let extra = (allowed.len() + 1).to_string();
    let lb = LbBuilder::new(&[echo]).set("tune", "threads", &extra).spawn();
    assert_eq!(worker_cpus(lb.pid()), vec![allowed.clone(); allowed.len() + 1]);
    // none: unbound.
    let lb = LbBuilder::new(&[echo])
        .set("tune", "threads", "2")
        .set("tune", "cpu_affinity", "none")
        .spawn();
    assert_eq!(worker_cpus(lb.pid()), vec![allowed.clone(); 2]);
    // A list: round robin over it.
    let last = *allowed.last().unwrap();
    let lb = LbBuilder::new(&[echo])
        .set("tune", "threads", "2")
        .set("tune", "cpu_affinity", &last.to_string())
        .spawn();
    assert_eq!(worker_cpus(lb.pid()), vec![vec![last]; 2]);
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, b"ping").await;
    // A CPU lb may not run on: it does not start, and says why.
    let err = LbBuilder::new(&[echo])
        .set("tune", "cpu_affinity", "1023")
        .try_spawn()
        .err()
        .expect("lb started bound to a CPU it may not run on");
    assert!(
        err.contains("tune.cpu_affinity names CPU 1023, which lb may not run on"),
        "{err}"
    );
}

/// Each session thread accepts from a socket of its own (SO_REUSEPORT), and the listener's
/// `maxconn` holds across them: with two threads and `maxconn: 1`, clients spread over both
/// sockets are served one at a time, each as soon as the one before it leaves, whichever
/// socket it waits on (a thread waiting for a connection holds no slot the other needs).
#[tokio::test]
async fn maxconn_holds_across_the_threads_sockets() {
    let echo = servers::echo().await;
    let lb = LbBuilder::new(&[echo])
        .set("tune", "threads", "2")
        .listener_yaml("    maxconn: 1\n")
        .spawn();
    // Sixteen, so that both sockets have some (all on one: 1 in 32,768).
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(TcpStream::connect(lb.listener).await.unwrap());
    }
    for c in &mut clients {
        c.write_all(b"x").await.unwrap();
    }
    // Served one at a time: exactly one client has its echo while it stays connected; when it
    // leaves, exactly one other gets its echo.
    let mut left = clients;
    while !left.is_empty() {
        let mut served = None;
        for _ in 0..500 {
            for (i, c) in left.iter_mut().enumerate() {
                let mut b = [0u8; 1];
                if let Ok(Ok(1)) = timeout(Duration::from_millis(10), c.read(&mut b)).await {
                    served = Some(i);
                    break;
                }
            }
            if served.is_some() {
                break;
            }
        }
        let i = served.unwrap_or_else(|| {
            panic!(
                "{} clients waiting, none served:\n{}",
                left.len(),
                lb.metrics().text
            )
        });
        let m = lb.metrics();
        assert_eq!(
            m.get("lb_active_connections{listener=\"test\"}"),
            1.0,
            "{}",
            m.text
        );
        drop(left.swap_remove(i));
    }
    let m = lb
        .wait_for("every session's end", |m| {
            m.get("lb_active_connections{listener=\"test\"}") == 0.0
        })
        .await;
    assert_eq!(
        m.get("lb_connections_total{listener=\"test\"}"),
        16.0,
        "{}",
        m.text
    );
    assert!(lb.log().contains("2 socket(s)"), "{}", lb.log());
}

/// The threads' sockets share their address with nothing else: a second lb on a listener's
/// address, or a second listener of one file on it, is refused at its start (before per-thread
/// accept, a plain bind refused them; SO_REUSEPORT alone would have let them share its
/// connections).
#[tokio::test]
async fn an_address_in_use_is_refused_not_shared() {
    let echo = servers::echo().await;
    let first = LbBuilder::new(&[echo]).set("tune", "threads", "2").spawn();
    let taken = first.listener;
    let start = |listeners: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.yaml");
        let text = format!(
            "admin:\n  listen: 127.0.0.1:0\ntune: {{ threads: 2 }}\nlisteners:\n{listeners}backends:\n  - name: b\n    servers:\n      - {{ name: s, address: \"{echo}\" }}\n"
        );
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(lb_binary());
        cmd.args(["run", "-c"]).arg(&path);
        spawn_command(cmd, dir)
    };
    let second = start(&format!("  - {{ name: again, bind: \"{taken}\", backend: b }}\n"));
    let err = second.err().expect("a second lb on a listener's address started");
    assert!(err.contains("in use"), "{err}");
    let port = lb_tests::daemons::free_port();
    let twice = start(&format!(
        "  - {{ name: one, bind: \"{port}\", backend: b }}\n  - {{ name: two, bind: \"{port}\", backend: b }}\n"
    ));
    let err = twice.err().expect("two listeners on one address started");
    assert!(err.contains("in use"), "{err}");
    drop(first);
}
