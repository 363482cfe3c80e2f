//! The end-to-end tests again, in throw-away virtual machines on kernels users run: Debian's 6.12
//! (bookworm-backports) and 6.1 (bookworm), under qemu, on the host's own files and binaries.
//!
//! - The TLS and HTTPS tests (`tls`, `http_mode`) on 6.12: this machine's kernel has no kTLS
//!   (CONFIG_TLS off), Debian's has; there every client session lb terminates is handed to the
//!   kernel's TLS after its handshake, and the tests require it (`LB_REQUIRE_KTLS=1`).
//! - The kernel-path tests (`kernel_path`, `peers`, `offload`, `flow_control`, `http_handoff`,
//!   `upgrade`, which moves kernel flows between processes, and `reload`, whose load test
//!   reloads and upgrades under wrk and 100 kernel streams) on 6.12 and on 6.1: the sockmap
//!   path has changed under lb between kernel versions, and this machine runs only one. They
//!   must find the BPF path (`LB_REQUIRE_BPF=1`).
//!
//! `vm/setup.sh` installs qemu and busybox-static when missing and builds a VM's files in
//! `target/vm-<kernel>` (idempotent; the apt lists are shared in `target/vm-apt`); `vm/run.sh`
//! runs one command in a VM: KVM where it works, software emulation (TCG) otherwise, as here and
//! in CI. Under TCG a byte costs some fifty times the CPU it costs here, so the kernel-path
//! tests run with `LB_TEST_SCALE` (their transfers divided by it, their tight time bounds
//! multiplied). Each kernel's tests take one VM boot: here about seven and a half minutes on
//! 6.12 (with the TLS tests) and six and a half on 6.1.
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{root, run_cmd};

/// The TLS targets, run with `LB_REQUIRE_KTLS=1` on the kernel that has kTLS.
const TLS_TARGETS: [&str; 2] = ["tls", "http_mode"];
/// The targets whose tests forward through the sockmap.
const KERNEL_PATH_TARGETS: [&str; 7] = [
    "kernel_path",
    "peers",
    "offload",
    "flow_control",
    "http_handoff",
    "upgrade",
    "reload",
];
/// `LB_TEST_SCALE` of the kernel-path tests in a VM (`lb_tests::scale`): sized for TCG on two
/// CPUs, where a paced reader's 100 MB/s was out of reach (about 13 MB/s per flow).
const SCALE: &str = "8";
/// The longest one VM may run its tests (the guest's `timeout`; run.sh adds its own margin).
const VM_TIMEOUT_SECS: u32 = 1500;

/// One VM run: a kernel and the test executables it runs, each with its environment.
struct Run {
    kernel: &'static str,
    jobs: Vec<(String, String)>,
}

/// Runs the VM tests: on 6.12 the TLS and kernel-path targets, on 6.1 the kernel-path ones;
/// (passed, failed). Every run goes on when one fails; the error names each that failed.
pub fn run() -> Result<(u64, u64)> {
    let exes = test_executables()?;
    let jobs = |targets: &[&str], env: &str| -> Vec<(String, String)> {
        let exe = |t: &str| exes.iter().find(|(n, _)| n == t).map(|(_, e)| e.clone());
        targets
            .iter()
            .filter_map(|&t| Some((env.to_string(), exe(t)?)))
            .collect()
    };
    let kernel_path = jobs(
        &KERNEL_PATH_TARGETS,
        &format!("LB_REQUIRE_BPF=1 LB_TEST_SCALE={SCALE}"),
    );
    let tls = jobs(&TLS_TARGETS, "LB_REQUIRE_BPF=1 LB_REQUIRE_KTLS=1");
    let runs = [
        Run {
            kernel: "6.12",
            jobs: [tls, kernel_path.clone()].concat(),
        },
        Run {
            kernel: "6.1",
            jobs: kernel_path,
        },
    ];
    let started = Instant::now();
    let (mut passed, mut failed, mut errors) = (0, 0, Vec::new());
    for r in &runs {
        match run_one(r) {
            Ok((p, f)) => (passed, failed) = (passed + p, failed + f),
            Err(e) => {
                println!("xtask: VM {}: {e:#}", r.kernel);
                errors.push(format!("{}: {e:#}", r.kernel));
            }
        }
    }
    println!(
        "xtask: VM tests: {passed} passed, {failed} failed, in {:.0?}",
        started.elapsed()
    );
    if !errors.is_empty() {
        bail!("the tests in the virtual machines failed: {}", errors.join("; "));
    }
    Ok((passed, failed))
}

/// Sets up the VM of `run.kernel` and runs its jobs in one boot.
fn run_one(run: &Run) -> Result<(u64, u64)> {
    let scripts = root().join("xtask/vm");
    let vm_dir = root().join(format!("target/vm-{}", run.kernel));
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    println!("xtask: VM {}: setting up (Debian's kernel, qemu)", run.kernel);
    run_cmd(
        Command::new("bash")
            .arg(scripts.join("setup.sh"))
            .env("LB_VM_DIR", &vm_dir)
            .env("LB_VM_KERNEL", run.kernel)
            .env("LB_VM_APT_DIR", root().join("target/vm-apt")),
    )?;
    let version = std::fs::read_to_string(vm_dir.join("kernel.version")).unwrap_or_default();
    // One boot for every job (a boot costs about ten seconds under TCG): a script that runs
    // each, says which, and fails at the end if one did.
    let mut script = String::from("st=0\n");
    for (env, exe) in &run.jobs {
        let name = exe.rsplit('/').next().unwrap_or(exe);
        let cmd = format!("env {env} {} --test-threads=2", quote(exe));
        script += &format!(
            "echo {m}; s=$SECONDS; {cmd} || {{ echo {f}; st=1; }}; echo \"xtask-vm: {name}: $((SECONDS - s)) s\"\n",
            m = quote(&format!("xtask-vm: {name} ({env})")),
            f = quote(&format!("xtask-vm: {name} FAILED")),
        );
    }
    script += "exit $st\n";
    println!(
        "xtask: VM {}: kernel {}, {} test executables",
        run.kernel,
        version.trim(),
        run.jobs.len()
    );
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(scripts.join("run.sh"))
        .args(["bash", "-c", &script])
        .current_dir(root())
        .env("LB_VM_DIR", &vm_dir)
        .env("VM_RW_DIRS", root())
        .env("VM_TIMEOUT", VM_TIMEOUT_SECS.to_string())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("starting vm/run.sh")?;
    let stdout = child.stdout.take().context("run.sh stdout")?;
    let (mut passed, mut failed, mut failures) = (0, 0, Vec::new());
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += crate::count_before(rest, " passed");
            failed += crate::count_before(rest, " failed");
        }
        if let Some(name) = line
            .strip_prefix("xtask-vm: ")
            .and_then(|l| l.strip_suffix(" FAILED"))
        {
            failures.push(name.to_string());
        }
    }
    let status = child.wait().context("waiting for run.sh")?;
    println!(
        "xtask: VM {}: {passed} passed, {failed} failed, in {:.0?}",
        run.kernel,
        started.elapsed()
    );
    if !status.success() {
        bail!(
            "kernel {}: {status}; failed: {}",
            version.trim(),
            if failures.is_empty() {
                "the VM itself (see above)".into()
            } else {
                failures.join(", ")
            }
        );
    }
    Ok((passed, failed))
}

/// `s` in single quotes for the guest's shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The test executables of the VM's targets (built already, by the main run) and listed by
/// cargo: (target, path).
fn test_executables() -> Result<Vec<(String, String)>> {
    let targets: Vec<&str> = TLS_TARGETS.iter().chain(&KERNEL_PATH_TARGETS).copied().collect();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["test", "-p", "lb-tests", "--no-run", "--message-format=json"]);
    for t in &targets {
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
        if let (Some(exe), true) = (msg["executable"].as_str(), targets.contains(&name)) {
            exes.push((name.to_string(), exe.to_string()));
        }
    }
    if exes.len() != targets.len() {
        bail!("expected the test executables of {targets:?}, cargo listed {exes:?}");
    }
    Ok(exes)
}
