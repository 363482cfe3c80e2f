//! lb under systemd: the unit in conf/ passes `systemd-analyze verify`; lb speaks sd_notify's
//! protocol to a notify socket of the test's own (READY=1, RELOADING=1 then READY=1, STOPPING=1);
//! and the unit's capability bounding set is enough to load the verdict program and forward in
//! the kernel. (No systemd runs here: the unit itself is not started.)
use lb_tests::{bpf_available, lb::LbBuilder, program_available, servers};
use std::{os::unix::net::UnixDatagram, path::Path, process::Command, time::Duration};
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
    // CapabilityBoundingSet= of the unit, as setpriv takes it.
    let unit = unit_text(Path::new("lb"));
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let echo = servers::echo().await;
    let builder = LbBuilder::new(&[echo]).forwarding("kernel").offload_after("0");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lb.yaml");
    std::fs::write(&config, builder.config_text()).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg(lb_tests::lb::lb_binary())
        .args(["run", "-c"])
        .arg(&config);
    let lb = lb_tests::lb::spawn_command(cmd, dir).expect("lb did not start with the unit's capabilities");
    let mut c = tokio::net::TcpStream::connect(lb.listener).await.unwrap();
    let payload = vec![7u8; 1 << 20];
    c.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut back))
        .await
        .expect("the echo did not come back")
        .unwrap();
    assert!(back == payload);
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
