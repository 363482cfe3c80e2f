//! `cargo xtask bench tcp`: throughput (iperf3) and connection rate through lb (kernel and user
//! forwarding) and HAProxy (as shipped and tuned), against direct connections. Prints markdown
//! tables and writes them to docs/benchmarks.md. `bench http` ([`http`]): requests/s and p99
//! through lb's and HAProxy's HTTP modes (docs/benchmarks-http.md); `bench tls` ([`tls`]): full
//! handshakes/s and bulk HTTPS through both (docs/benchmarks-tls.md); `bench idle` ([`idle`]);
//! `bench reload` ([`reload`], [`upgrade`]): the time to apply a reload of 1,000 servers, and
//! from `lb upgrade` to the old process's exit with 9,000 kernel flows moved.
//!
//! Layout: [`sys`] (namespaces, child processes, CPU counters), [`configs`] (starting each
//! proxy), [`iperf`] and [`connrate`] (one measurement each), [`phases`] (the loops over runs
//! and configurations), [`stats`] and [`report`] (medians, tables, targets).
mod configs;
mod connrate;
mod http;
mod http_report;
mod idle;
mod iperf;
mod offload;
mod offload_report;
mod phases;
mod reload;
mod report;
mod stats;
mod sys;
mod tls;
mod upgrade;

pub use connrate::{connect_client, echo_server};
pub use http::backend as http_backend;
pub use idle::{hold_server, idle_client};
pub use offload::{client as peer_client, serve as peers_server};
pub use tls::handshake_client as tls_client;

use anyhow::{bail, Context, Result};
use configs::{Config, Env};
use std::{process::Command, time::Instant};

/// Runs benchmark `what`: `tcp` with `runs` runs per configuration and `seconds` per
/// measurement, or `idle` with `connections` idle connections. `peers`: for `offload`, only
/// these (by name); `keep`: the working directory stays.
pub fn run(
    what: &str,
    runs: usize,
    seconds: u32,
    connections: u64,
    peers: &[String],
    keep: bool,
) -> Result<()> {
    if !["tcp", "conn", "offload", "http", "tls", "idle", "reload"].contains(&what) {
        bail!("unknown benchmark {what:?}; available: tcp, conn, offload, http, tls, idle, reload");
    }
    if !peers.is_empty() && what != "offload" {
        bail!("--peers chooses among the offload peers: `bench offload --peers ...`");
    }
    let peers = peers
        .iter()
        .map(|p| offload::Peer::from_name(p))
        .collect::<Result<Vec<_>>>()?;
    if runs == 0 || seconds == 0 || connections == 0 {
        bail!("--runs, --seconds and --connections must be at least 1");
    }
    ensure_tools()?;
    let ebpf = crate::setup::ensure(false)?;
    // A failed build must not fall back to an older binary: the lb rows report it instead.
    let built = crate::lb_bin::build(true, ebpf);
    // Taken now: the work tree may change while the benchmark runs.
    let lb_version = lb_version();
    sys::catch_interrupts();
    sys::remove_stale_namespaces();
    let mut tmp = sys::TempDir::create()?;
    if keep {
        tmp.keep = true;
        eprintln!("xtask bench: working directory {} (kept)", tmp.path.display());
    }
    // Every run uses copies taken now: a cargo build by someone else during the benchmark must
    // neither swap the lb being measured nor remove the xtask binary the helpers run from
    // (/proc/self/exe stays readable even after the file is replaced).
    let lb = built
        .and_then(|lb| {
            let copy = tmp.path.join("lb");
            std::fs::copy(&lb, &copy).with_context(|| format!("copying {}", lb.display()))?;
            Ok(copy)
        })
        .map_err(|err| {
            eprintln!("xtask bench: WARNING: {err:#}; the lb configurations will fail");
            format!("{err:#}")
        });
    let helper = tmp.path.join("xtask-helper");
    std::fs::copy("/proc/self/exe", &helper).context("copying the xtask binary")?;
    let env = Env {
        dir: tmp.path.clone(),
        lb,
        helper,
    };
    if what == "idle" {
        let report = idle::measure(&env, connections)?;
        let text = report.markdown(&lb_version, &utc_now());
        return write_report("benchmarks-idle.md", &text);
    }
    if what == "reload" {
        // 10 reloads per run; then upgrades (one per run) with `connections` kernel flows.
        let report = reload::measure(&env, runs * 10)?;
        let flows = connections.min(9_000);
        let upgrades = upgrade::measure(&env, flows, runs.max(2))?;
        let text = report.markdown(&lb_version, &utc_now()) + &reload::upgrade_markdown(flows, &upgrades);
        return write_report("benchmarks-reload.md", &text);
    }
    if what == "http" {
        return http_bench(&env, runs, seconds, lb_version);
    }
    if what == "offload" {
        if !peers.is_empty() {
            let results = offload::measure_some(&env, &peers, runs, seconds)?;
            let mut text = String::new();
            offload_report::markdown(&mut text, &results, runs);
            println!("{text}");
            return Ok(());
        }
        return offload_bench(&env, runs, seconds, lb_version);
    }
    if what == "conn" {
        // The connection-rate table of `tcp` alone, printed (docs/ keeps the whole run's).
        let conn = phases::connection_rate(&env, runs, seconds)?;
        let mut text = format!("lb at {lb_version}\n");
        report::conn_table(&mut text, &conn);
        println!("{text}");
        return Ok(());
    }
    if what == "tls" {
        eprintln!(
            "xtask bench: {runs} run(s) × 2 certificates × 2 tests × 2 configurations × {seconds} s: about {:.0} min",
            (runs * 8) as f64 * (f64::from(seconds) + 1.0) / 60.0
        );
        let text = tls::measure_all(&env, runs, seconds)?;
        return write_report("benchmarks-tls.md", &text);
    }
    let started = Instant::now();
    // Set-up took about 0.5 s per iperf3 test and 1 s per connection-rate test here.
    let tests = Config::ALL.len() * runs;
    let estimate = tests as f64
        * (iperf::Test::ALL.len() as f64 * (f64::from(seconds) + 0.5) + f64::from(seconds) + 1.0);
    eprintln!(
        "xtask bench: {runs} run(s) × {} configurations × ({} iperf3 tests + 1 connection-rate test) × {seconds} s: about {:.0} min",
        Config::ALL.len(),
        iperf::Test::ALL.len(),
        estimate / 60.0
    );

    let throughput = phases::throughput(&env, runs, seconds)?;
    let conn = phases::connection_rate(&env, runs, seconds)?;
    let offload = offload::measure_all(&env, runs, seconds)?;

    let meta = report::Meta {
        date: utc_now(),
        kernel: first_line(Command::new("uname").arg("-r")),
        cpus: cpus(),
        iperf3: first_line(Command::new("iperf3").arg("--version")),
        haproxy: haproxy_version(),
        lb_version,
        runs,
        seconds,
        minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    let text = report::markdown(
        &meta,
        &report::Results {
            throughput,
            conn,
            offload,
        },
    );
    write_report("benchmarks.md", &text)
}

/// `bench http`: every run, the report, docs/benchmarks-http.md.
fn http_bench(env: &Env, runs: usize, seconds: u32, lb_version: String) -> Result<()> {
    let started = Instant::now();
    eprintln!(
        "xtask bench: {runs} run(s) × {} configurations × {} tests × {seconds} s: about {:.0} min",
        http::Setup::ALL.len(),
        http::Test::ALL.len(),
        (runs * http::Setup::ALL.len() * http::Test::ALL.len()) as f64 * (f64::from(seconds) + 1.0) / 60.0
    );
    let results = http::measure_all(env, runs, seconds)?;
    let meta = http_report::Meta {
        date: utc_now(),
        kernel: first_line(Command::new("uname").arg("-r")),
        cpus: cpus(),
        // wrk prints its version with its usage, and exits 1.
        wrk: first_line(Command::new("wrk").arg("--version"))
            .split(" [")
            .next()
            .unwrap_or("wrk")
            .to_string(),
        haproxy: haproxy_version(),
        lb_version,
        runs,
        seconds,
        minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    let text = http_report::markdown(&meta, &results);
    write_report("benchmarks-http.md", &text)
}

/// `bench offload`: the offload-share table alone (it is part of `bench tcp`), written to
/// docs/benchmarks-offload.md.
fn offload_bench(env: &Env, runs: usize, seconds: u32, lb_version: String) -> Result<()> {
    let started = Instant::now();
    let results = offload::measure_all(env, runs, seconds)?;
    let mut text = format!(
        "# Offload share\n\nGenerated by `cargo xtask bench offload --runs {runs} --seconds {seconds}` on {}; kernel {}, {} CPUs; lb at commit {lb_version}. It took {:.1} min. `cargo xtask bench tcp` measures the same as part of docs/benchmarks.md.\n",
        utc_now(),
        first_line(Command::new("uname").arg("-r")),
        cpus(),
        started.elapsed().as_secs_f64() / 60.0
    );
    offload_report::markdown(&mut text, &results, runs);
    write_report("benchmarks-offload.md", &text)
}

/// Installs iperf3, HAProxy and wrk from Debian when missing.
fn ensure_tools() -> Result<()> {
    crate::setup::ensure_programs(
        "xtask bench",
        "the peers and load generators the benchmarks measure against",
        &[
            ("iperf3", "iperf3"),
            ("haproxy", "haproxy"),
            ("wrk", "wrk"),
            ("openssl", "openssl"),
            ("curl", "curl"),
        ],
    )
}

/// The commit lb was built from, and whether the work tree had changes (what was measured).
fn lb_version() -> String {
    let root = crate::root();
    let commit = first_line(
        Command::new("git")
            .current_dir(&root)
            .args(["rev-parse", "--short", "HEAD"]),
    );
    let dirty = Command::new("git")
        .current_dir(&root)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty {
        format!("{commit} with uncommitted changes")
    } else {
        commit
    }
}

/// The first line a command prints, or "unknown" (for the report header only).
/// Prints a report and writes it to docs/`file`.
fn write_report(file: &str, text: &str) -> Result<()> {
    println!("{text}");
    let docs = crate::root().join("docs");
    std::fs::create_dir_all(&docs).with_context(|| format!("creating {}", docs.display()))?;
    let path = docs.join(file);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask bench: wrote {}", path.display());
    Ok(())
}

/// The date and time for a report's header.
fn utc_now() -> String {
    first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/", without the URL.
fn haproxy_version() -> String {
    first_line(Command::new("haproxy").arg("-v"))
        .split(" - ")
        .next()
        .unwrap_or("HAProxy")
        .to_string()
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
