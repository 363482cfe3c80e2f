//! `cargo xtask …`: what cargo cannot do alone.
//!
//! - `setup`: install the eBPF toolchain (idempotent; run by `demo`, `test` and `bench`).
//! - `demo`: lb on conf/demo.yaml with two loopback demo servers.
//! - `test`: the whole test suite, the fresh-machine check included.
//! - `test-vm`: the tests in virtual machines alone (see [`vm`]).
//! - `fresh`: setup and a build of lb from an empty rustup and cargo home.
//! - `bench tcp`: iperf3 and connection-rate benchmarks (lb kernel, lb user, HAProxy, direct),
//!   and the offload-share table (`bench offload` alone).
//! - `bench http`, `bench tls`: HTTP and TLS against HAProxy.
//! - `bench idle`: lb's memory for 10,000 idle kernel-forwarded connections.
//! - `bench reload`: the time to apply a reload of a file with 1,000 servers.
mod bench;
mod demo;
mod fresh;
mod lb_bin;
mod setup;
mod vm;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::{path::PathBuf, process::Command};

#[derive(Parser)]
#[command(name = "xtask", about = "lb's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs (LLVM 22, the toolchain pinned in
    /// lb-ebpf/rust-toolchain.toml with its rust-src, bpf-linker). Idempotent.
    Setup,
    /// Check what a fresh machine gets: setup and a build of lb from an empty rustup and cargo
    /// home, which must end with the eBPF program built in and the other toolchains untouched.
    Fresh {
        /// Put the channel's newest unversioned `nightly` in the empty home first.
        #[arg(long)]
        nightly: bool,
    },
    /// Build lb and run it on conf/demo.yaml with two demo servers on loopback.
    Demo,
    /// Run every test (privileged BPF tests included when run as root); a whole run ends with
    /// the kTLS and kernel-path tests in virtual machines on Debian's 6.12 and 6.1 kernels, and
    /// the fresh-machine check (`fresh`).
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run only the tests in virtual machines (what a whole `test` run ends with): the kTLS
    /// tests on Debian's 6.12, the kernel-path tests on 6.12 and 6.1. As root.
    TestVm,
    /// Run a benchmark: `tcp` (throughput and connection rate against HAProxy and direct),
    /// `http` (requests/s and p99 with wrk against HAProxy's HTTP mode and direct), `tls` (full
    /// handshakes/s and bulk HTTPS against HAProxy, ECDSA and RSA certificates), `idle`
    /// (lb's memory for idle kernel-forwarded connections) or `reload` (the time to apply a
    /// reload of 1,000 servers; 10 reloads per run).
    Bench {
        /// Which benchmark: `tcp`, `conn` (the connection-rate table of `tcp` alone, printed),
        /// `offload` (the offload-share table of `tcp` alone), `http`, `tls`, `idle` or `reload`.
        what: String,
        /// Runs per configuration (medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per measurement (iperf3 or wrk run).
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// `idle`: connections held open.
        #[arg(long, default_value_t = 10_000)]
        connections: u64,
        /// `offload`: only these peers (comma-separated names, e.g. `paced-100,iperf3-up`); the
        /// table is printed, not written to docs/.
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        /// Keep the working directory (every proxy's configuration and log) and print its path.
        #[arg(long)]
        keep: bool,
    },
    /// Internal to `bench idle`: the backend that echoes and holds connections.
    #[command(hide = true)]
    BenchHold {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        lifetime: u64,
    },
    /// Internal to `bench idle`: the client that opens and holds idle connections.
    #[command(hide = true)]
    BenchIdleClient {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        admin_port: u16,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        hold: u64,
    },
    /// Internal to `bench tls`: the full-handshake client.
    #[command(hide = true)]
    BenchTlsClient {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        ca: PathBuf,
    },
    /// Internal to `bench tcp`: the connection-rate echo server.
    #[command(hide = true)]
    BenchEcho {
        #[arg(long)]
        port: u16,
        /// Stop after this many seconds at the latest.
        #[arg(long)]
        lifetime: u64,
    },
    /// Internal to `bench http`: the keep-alive HTTP backend with canned answers.
    #[command(hide = true)]
    BenchHttpBackend {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        lifetime: u64,
    },
    /// Internal to `bench tcp` (offload share): every peer server, on ports from `port` on.
    #[command(hide = true)]
    BenchPeers {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        lifetime: u64,
    },
    /// Internal to `bench tcp` (offload share): one peer's clients.
    #[command(hide = true)]
    BenchPeerClient {
        #[arg(long)]
        peer: String,
        #[arg(long)]
        port: u16,
    },
    /// Internal to `bench tcp`: the connection-rate client.
    #[command(hide = true)]
    BenchConnect {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::ensure(true).map(|_| ()),
        Task::Fresh { nightly } => fresh::run(nightly),
        Task::Demo => demo::run(),
        Task::Test { args } => test(args),
        Task::TestVm => test_vm(),
        Task::Bench {
            what,
            runs,
            seconds,
            connections,
            peers,
            keep,
        } => bench::run(&what, runs, seconds, connections, &peers, keep),
        Task::BenchHold { port, lifetime } => bench::hold_server(port, lifetime),
        Task::BenchIdleClient {
            port,
            admin_port,
            count,
            hold,
        } => bench::idle_client(port, admin_port, count, hold),
        Task::BenchEcho { port, lifetime } => bench::echo_server(port, lifetime),
        Task::BenchConnect { port, seconds } => bench::connect_client(port, seconds),
        Task::BenchPeers { port, lifetime } => bench::peers_server(port, lifetime),
        Task::BenchPeerClient { peer, port } => bench::peer_client(&peer, port),
        Task::BenchHttpBackend { port, lifetime } => bench::http_backend(port, lifetime),
        Task::BenchTlsClient { port, seconds, ca } => bench::tls_client(port, seconds, &ca),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Cargo's target directory (CARGO_TARGET_DIR, or `target` in the workspace).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Runs a command to completion, failing with its name when it fails.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn test(args: Vec<String>) -> Result<()> {
    let ebpf = setup::ensure(false)?;
    if !ebpf {
        eprintln!("xtask: WARNING: the eBPF toolchain is missing: lb is built without kernel forwarding and BPF tests will skip");
    }
    // The HTTP tests drive lb with real clients (curl, Python's http.client, wrk), the TLS
    // tests with openssl s_client too; the stats page is opened in a headless browser; the
    // PROXY protocol tests put HAProxy and nginx on either side of lb.
    setup::ensure_programs(
        "xtask test",
        "the clients the end-to-end tests drive lb with",
        &[
            ("curl", "curl"),
            ("python3", "python3"),
            // The real Prometheus text parser the /metrics test checks the scrape with.
            ("python3:prometheus_client", "python3-prometheus-client"),
            ("wrk", "wrk"),
            ("openssl", "openssl"),
            ("chromium", "chromium"),
            ("systemd-analyze", "systemd"),
            ("haproxy", "haproxy"),
            ("nginx", "nginx"),
        ],
    )?;
    // The end-to-end tests run the real `lb` binary, which `cargo test` alone does not build.
    lb_bin::build(false, ebpf)?;
    // Skipped tests pass (their output is captured), so they also append a line to this file,
    // which is shown and counted at the end.
    let skip_log = root().join("target/lb-test-skipped.txt");
    std::fs::write(&skip_log, "").context("creating the skip log")?;
    let mut test = Command::new("cargo");
    test.current_dir(root())
        .args(["test", "--workspace", "--all-targets"])
        .args(&args)
        .env("LB_SKIP_LOG", &skip_log)
        .stdout(std::process::Stdio::piped());
    let mut child = test.spawn().context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    // Whole runs only (a filter is for the tests here), and only when the rest passed:
    // - the kTLS and kernel-path tests, in virtual machines on other kernels, as root with the
    //   eBPF build (the VMs run the same binaries);
    // - the fresh-machine check, one test more, where setup works here (it runs it again).
    let whole = status.success() && args.is_empty();
    let in_vm = if whole && ebpf && is_root() {
        let (p, f) = vm::run()?;
        (passed, failed) = (passed + p, failed + f);
        true
    } else {
        false
    };
    let fresh = (whole && ebpf).then(|| fresh::run(false));
    if let Some(Err(err)) = &fresh {
        println!("FAILED the fresh-machine check (cargo xtask fresh): {err:#}");
    }
    let fresh_failed = matches!(fresh, Some(Err(_)));
    if fresh.is_some() {
        (passed, failed) = (
            passed + u64::from(!fresh_failed),
            failed + u64::from(fresh_failed),
        );
    }
    let mut skipped: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    if !in_vm && args.is_empty() {
        skipped.push(
            "the kTLS and kernel-path tests in virtual machines (they need root, the eBPF build, and the rest passing)"
                .into(),
        );
    }
    if fresh.is_none() && args.is_empty() {
        skipped.push("the fresh-machine check (it needs setup to work here and the rest passing)".into());
    }
    for line in &skipped {
        println!("SKIPPED {line}");
    }
    println!(
        "summary: {passed} passed, {failed} failed, {} skipped",
        skipped.len()
    );
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if fresh_failed {
        bail!("the fresh-machine check failed");
    }
    Ok(())
}

fn test_vm() -> Result<()> {
    if !setup::ensure(false)? || !is_root() {
        bail!("the tests in virtual machines need the eBPF build (`cargo xtask setup`) and root");
    }
    lb_bin::build(false, true)?;
    let (passed, failed) = vm::run()?;
    println!("summary: {passed} passed, {failed} failed");
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The number right before `word` in a `test result:` line ("ok. 7 passed; 0 failed; …").
fn count_before(line: &str, word: &str) -> u64 {
    let Some(end) = line.find(word) else { return 0 };
    line[..end]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
