//! lb under systemd: the unit in conf/ passes `systemd-analyze verify`; lb speaks sd_notify's
//! protocol to a notify socket of the test's own (READY=1, RELOADING=1 then READY=1, STOPPING=1);
//! and the unit's capability bounding set is enough to load the verdict program and forward in
//! the kernel. (No systemd runs here: the unit itself is not started.)
use lb_tests::{bpf_available, lb::LbBuilder, program_available, servers};
use std::{net::SocketAddr, os::unix::net::UnixDatagram, path::Path, process::Command, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// conf/lb.service, with its binary's path replaced by `lb`.
fn unit_text(lb: &Path) -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/lb.service");
    std::fs::read_to_string(&unit)
        .unwrap()
        .replace("/usr/local/bin/lb", &lb.display().to_string())
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !program_available("the_unit_passes_systemd_analyze_verify", "systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("lb.service");
    std::fs::write(&unit, unit_text(&lb_tests::lb::lb_binary())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    // A setting it does not understand is only a warning: any output is a failure.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    // The test can fail: a wrong setting is said.
    std::fs::write(
        &unit,
        unit_text(&lb_tests::lb::lb_binary()).replace("Type=notify", "Type=notifyy"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(!out.stderr.is_empty(), "a wrong Type= passed");
}

/// The next notification lb sent (at most 10 s).
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("no notification from lb within 10 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn lb_tells_systemd_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(servers::echo());
    let mut lb = LbBuilder::new(&[echo])
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .forwarding("user")
        .spawn();
    let ready = next(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // SAFETY: a plain signal to the child's pid.
    assert_eq!(unsafe { libc::kill(lb.pid() as i32, libc::SIGHUP) }, 0);
    let reloading = next(&socket);
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1")
            && reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    let ready = next(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(lb.terminate(Duration::from_secs(20)).is_some(), "lb did not stop");
    let stopping = next(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}

/// The unit's `CapabilityBoundingSet=`, as capability names (`bpf`, `net_admin`, ...).
fn unit_capabilities() -> Vec<String> {
    unit_text(Path::new("lb"))
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet=").map(str::to_owned))
        .expect("the unit sets CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// `lb run` under setpriv with only `caps` (bounding, inheritable and ambient sets cleared of
/// every other), as systemd starts it with the unit's bounding set.
fn lb_with_capabilities(caps: &[String], server: SocketAddr) -> Result<lb_tests::lb::Lb, String> {
    let builder = LbBuilder::new(&[server]).forwarding("kernel").offload_after("0");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lb.yaml");
    std::fs::write(&config, builder.config_text()).unwrap();
    let plus: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all,{}", plus.join(",")))
        .args(["--inh-caps=-all", "--ambient-caps=-all"])
        .arg(lb_tests::lb::lb_binary())
        .args(["run", "-c"])
        .arg(&config);
    lb_tests::lb::spawn_command(cmd, dir)
}

/// The effective capability set of process `pid` (CapEff in /proc/PID/status).
fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[tokio::test]
async fn the_units_capabilities_are_enough_for_kernel_forwarding() {
    if !bpf_available("the_units_capabilities_are_enough_for_kernel_forwarding")
        || !program_available(
            "the_units_capabilities_are_enough_for_kernel_forwarding",
            "setpriv",
        )
    {
        return;
    }
    let caps = unit_capabilities();
    let echo = servers::echo().await;
    // Without CAP_PERFMON the kernel refuses the program, and lb says what it needs.
    let fewer: Vec<String> = caps.iter().filter(|c| *c != "perfmon").cloned().collect();
    assert!(fewer.len() < caps.len(), "the unit has no CAP_PERFMON: {caps:?}");
    let Err(refused) = lb_with_capabilities(&fewer, echo) else {
        panic!("lb loaded its program without CAP_PERFMON");
    };
    assert!(refused.contains("CAP_PERFMON"), "{refused}");
    // With the unit's set: only those, and the flow goes through the kernel.
    let lb = lb_with_capabilities(&caps, echo).expect("lb did not start with the unit's capabilities");
    // CAP_NET_ADMIN 12, CAP_NET_BIND_SERVICE 10, CAP_PERFMON 38, CAP_BPF 39
    // (include/uapi/linux/capability.h).
    let bit = |c: &str| match c {
        "net_bind_service" => 1u64 << 10,
        "net_admin" => 1 << 12,
        "perfmon" => 1 << 38,
        "bpf" => 1 << 39,
        other => panic!("no bit for {other} here"),
    };
    let expected = caps.iter().map(|c| bit(c)).fold(0, |a, b| a | b);
    assert_eq!(effective_capabilities(lb.pid()), expected);
    let mut c = tokio::net::TcpStream::connect(lb.listener).await.unwrap();
    servers::echo_round_trip(&mut c, &vec![7u8; 1 << 20]).await;
    // The flow's kernel bytes are counted when it ends.
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("the flow did not end")
        .unwrap();
    let m = lb
        .wait_for("bytes through the kernel", |m| m.kernel_bytes() > 0.0)
        .await;
    assert_eq!(m.get("lb_kernel_forwarding"), 1.0, "{}", m.text);
}
