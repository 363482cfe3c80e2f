//! Fixtures for lb's end-to-end tests: the real `lb` binary on a generated configuration, real
//! servers and clients on 127.0.0.1, real BPF when the machine allows it.
//!
//! - [`lb`]: [`LbBuilder`](lb::LbBuilder) writes a config, starts `lb run`, waits until it
//!   listens, and reads its metrics.
//! - [`servers`]: in-process test servers (echo, the integrity peer, refusing and black-hole
//!   addresses).
//! - [`flows`]: the integrity client: random bytes both ways at once, sha256 on both ends.
//! - [`peers`]: peers that behave like real ones (a serial echo server, pipelining, paced
//!   readers), shared with the benchmarks.
//! - [`scenarios`]: the forwarding tests, written once and run on both forwarding paths.
//! - [`http`]: an lb with a `mode: http` listener, a reflecting backend, a raw HTTP client.
//! - [`tls`]: a private CA and certificates made by the tests, TLS clients and servers.
//! - [`daemons`]: HAProxy and nginx, run from a configuration of the test's.
pub mod daemons;
pub mod flows;
pub mod http;
pub mod lb;
pub mod paced;
pub mod peers;
pub mod scenarios;
pub mod servers;
pub mod tls;

/// How many times slower than the machines the tests' sizes and time bounds were chosen on
/// this one is: `LB_TEST_SCALE` (a whole number, 1 when unset). `cargo xtask test` sets it for
/// its runs in software-emulated virtual machines, where a byte costs tens of times the CPU it
/// costs natively: the tests that move many bytes divide their transfers by it ([`scaled`],
/// [`scaled_rate`]) and multiply their tight time bounds ([`slack`]), so that they test the same
/// things in a time that fits.
pub fn scale() -> u32 {
    match std::env::var("LB_TEST_SCALE") {
        Err(_) => 1,
        Ok(v) => v
            .parse::<u32>()
            .ok()
            .filter(|&n| n >= 1)
            .unwrap_or_else(|| panic!("LB_TEST_SCALE={v}: expected a whole number >= 1")),
    }
}

/// A transfer size (or a count of flows) divided by [`scale`], at least 1.
pub fn scaled(n: usize) -> usize {
    (n / scale() as usize).max(1)
}

/// A rate in bytes per second divided by [`scale`]: with [`scaled`] sizes, a paced transfer
/// takes as long as unscaled.
pub fn scaled_rate(rate: f64) -> f64 {
    rate / f64::from(scale())
}

/// A time bound multiplied by [`scale`].
pub fn slack(bound: std::time::Duration) -> std::time::Duration {
    bound * scale()
}

/// Awaits every client task (each at most `bound`), then one server report per client (each at
/// most 30 s), keyed by the seed `seed_of` reads from it. A timeout or a failed flow fails the
/// test.
pub async fn gather<C, S>(
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<C>>>,
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<S>,
    seed_of: impl Fn(&S) -> u64,
    bound: std::time::Duration,
) -> (Vec<C>, std::collections::HashMap<u64, S>) {
    use tokio::time::timeout;
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(
            timeout(bound, t)
                .await
                .expect("flow timed out")
                .unwrap()
                .expect("flow failed"),
        );
    }
    let mut by_seed = std::collections::HashMap::new();
    for _ in 0..clients.len() {
        let r = timeout(std::time::Duration::from_secs(30), reports.recv())
            .await
            .expect("server report timed out")
            .expect("the server stopped");
        by_seed.insert(seed_of(&r), r);
    }
    (clients, by_seed)
}

/// Declares one `#[tokio::test]` per named scenario in [`scenarios`], run on `$path` when
/// `$guard(test name)` allows it: `tests/kernel_path.rs` and `tests/user_path.rs` run the same
/// list on both forwarding paths.
#[macro_export]
macro_rules! scenario_tests {
    ($path:expr, $guard:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if ($guard)(stringify!($name)) {
                    $crate::scenarios::$name($path).await;
                }
            }
        )+
    };
}

/// Declares every forwarding scenario as a test on `$path` (see [`scenario_tests!`]).
#[macro_export]
macro_rules! forwarding_scenarios {
    ($path:expr, $guard:expr) => {
        $crate::scenario_tests!($path, $guard;
            big_transfer,
            many_flows,
            early_bytes_do_not_stall,
            half_close_client_first,
            half_close_server_first,
            reset_is_passed_on,
            idle_flows_time_out,
            reset_after_half_close,
            shutdown_resets_flows_left_after_the_grace_period,
            idle_timeout_with_bytes_in_flight_resets,
        );
    };
}

/// Whether privileged BPF tests can run here. When they cannot, prints a visible SKIPPED line
/// and returns false, unless `LB_REQUIRE_BPF=1` (set by `.ci/run`), which makes a skip a failure.
pub fn bpf_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let version = std::process::Command::new(lb::lb_binary())
        .arg("--version")
        .output();
    let built_in = version
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("eBPF sockmap forwarding built in"));
    let why = match (root, built_in) {
        (true, true) => return true,
        (false, _) => "not running as root (BPF sockmap needs CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON)",
        (true, false) => "lb was built without its eBPF program (run `cargo xtask setup`)",
    };
    skip(test, why);
    false
}

/// Whether `program` (one `cargo xtask test` installs) is on PATH; when not, a visible skip
/// (a failure under `LB_REQUIRE_BPF=1`, where CI has installed everything).
pub fn program_available(test: &str, program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join(program).is_file()) {
        return true;
    }
    skip(
        test,
        &format!("`{program}` is not installed (`cargo xtask test` installs it)"),
    );
    false
}

/// Debian's Python, which sees the modules Debian's packages install (a `python3` earlier on PATH,
/// pyenv's say, does not).
pub const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Whether Debian's Python imports `module` (one `cargo xtask test` installs, e.g.
/// `prometheus_client`); when not, a visible skip (a failure under `LB_REQUIRE_BPF=1`).
pub fn python_module_available(test: &str, module: &str) -> bool {
    let imported = std::process::Command::new(DEBIAN_PYTHON)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !imported {
        skip(
            test,
            &format!("{DEBIAN_PYTHON} cannot import `{module}` (`cargo xtask test` installs it)"),
        );
    }
    imported
}

/// Says a test is skipped: on stderr and in `LB_SKIP_LOG` (cargo test captures a passing
/// test's output; `cargo xtask test` lists skips from that file). Under `LB_REQUIRE_BPF=1`
/// (set by `.ci/run`) a skip is a failure.
fn skip(test: &str, why: &str) {
    if std::env::var("LB_REQUIRE_BPF").as_deref() == Ok("1") {
        panic!("{test}: LB_REQUIRE_BPF=1 but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    if let Ok(path) = std::env::var("LB_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).create(true).open(path) {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}
