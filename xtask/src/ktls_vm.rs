//! The kTLS tests: this machine's kernel has no kTLS (CONFIG_TLS off), so the TLS and HTTPS
//! end-to-end tests run again inside a throw-away virtual machine whose kernel has it (Debian's
//! 6.12 from bookworm-backports, under qemu), on the host's own files and binaries. There every
//! client session lb terminates is handed to the kernel's TLS after its handshake, and the
//! tests require it (`LB_REQUIRE_KTLS=1`).
//!
//! `ktls-vm/setup.sh` installs qemu and busybox-static when missing and builds the VM's files in
//! `target/ktls-vm` (idempotent); `ktls-vm/run.sh` runs one command in a VM: KVM where it works,
//! software emulation (TCG) otherwise, as here (about 30 s for the TLS tests).
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

use crate::{root, run_cmd};

/// The end-to-end test targets run in the VM.
const TARGETS: [&str; 2] = ["tls", "http_mode"];

/// Runs the TLS and HTTPS end-to-end tests in the VM; (passed, failed).
pub fn run() -> Result<(u64, u64)> {
    let scripts = root().join("xtask/ktls-vm");
    let vm_dir = root().join("target/ktls-vm");
    std::fs::create_dir_all(&vm_dir).context("creating target/ktls-vm")?;
    println!("xtask: kTLS tests: setting up the virtual machine (a Debian kernel with CONFIG_TLS)");
    run_cmd(
        Command::new("bash")
            .arg(scripts.join("setup.sh"))
            .env("LB_VM_DIR", &vm_dir),
    )?;
    let (mut passed, mut failed) = (0, 0);
    for exe in test_executables()? {
        println!("xtask: kTLS tests: {exe} in the virtual machine");
        let mut cmd = Command::new("bash");
        cmd.arg(scripts.join("run.sh"))
            .args([
                "env",
                "LB_REQUIRE_BPF=1",
                "LB_REQUIRE_KTLS=1",
                &exe,
                "--test-threads=2",
            ])
            .current_dir(root())
            .env("LB_VM_DIR", &vm_dir)
            .env("VM_RW_DIRS", root())
            .env("VM_TIMEOUT", "900")
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().context("starting ktls-vm/run.sh")?;
        let stdout = child.stdout.take().context("run.sh stdout")?;
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                passed += crate::count_before(rest, " passed");
                failed += crate::count_before(rest, " failed");
            }
        }
        let status = child.wait().context("waiting for run.sh")?;
        if !status.success() {
            bail!("the kTLS tests of {exe} failed in the virtual machine: {status}");
        }
    }
    Ok((passed, failed))
}

/// The test executables of [`TARGETS`], built (already, by the main run) and listed by cargo.
fn test_executables() -> Result<Vec<String>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["test", "-p", "lb-tests", "--no-run", "--message-format=json"]);
    for t in TARGETS {
        cmd.args(["--test", t]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", out.status);
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or("");
        if let (Some(exe), true) = (msg["executable"].as_str(), TARGETS.contains(&name)) {
            exes.push(exe.to_string());
        }
    }
    if exes.len() != TARGETS.len() {
        bail!("expected the test executables of {TARGETS:?}, cargo listed {exes:?}");
    }
    Ok(exes)
}
