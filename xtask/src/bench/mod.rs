//! `cargo xtask bench tcp`: throughput (iperf3) and connection rate through lb (kernel and user
//! forwarding) and HAProxy (as shipped and tuned), against direct connections. Prints markdown
//! tables and writes them to docs/benchmarks.md.
//!
//! Layout: [`sys`] (namespaces, child processes, CPU counters), [`configs`] (starting each
//! proxy), [`iperf`] and [`connrate`] (one measurement each), [`stats`] and [`report`] (medians,
//! tables, targets).
mod configs;
mod connrate;
mod iperf;
mod report;
mod stats;
mod sys;

pub use connrate::{connect_client, echo_server};

use anyhow::{bail, Context, Result};
use configs::{Config, Env};
use stats::ByConfig;
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};
use sys::Netns;

/// Runs benchmark `what` (only `tcp` exists) with `runs` runs per configuration and `seconds`
/// per measurement.
pub fn run(what: &str, runs: usize, seconds: u32) -> Result<()> {
    if what != "tcp" {
        bail!("unknown benchmark {what:?}; available: tcp");
    }
    if runs == 0 || seconds == 0 {
        bail!("--runs and --seconds must be at least 1");
    }
    ensure_tools()?;
    // A failed build must not fall back to an older binary: the lb rows report it instead.
    let lb = build_lb().map_err(|err| {
        eprintln!("xtask bench: WARNING: {err:#}; the lb configurations will fail");
        format!("{err:#}")
    });
    sys::catch_interrupts();
    sys::remove_stale_namespaces();
    let tmp = sys::TempDir::create()?;
    let env = Env {
        dir: tmp.path.clone(),
        lb,
    };
    let started = Instant::now();
    eprintln!(
        "xtask bench: {runs} run(s) × {} configurations × ({} iperf3 tests + 1 connection-rate test) × {seconds} s",
        Config::ALL.len(),
        iperf::Test::ALL.len()
    );

    let throughput = throughput_phase(&env, runs, seconds)?;
    let conn = connrate_phase(&env, runs, seconds)?;

    let meta = report::Meta {
        date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        kernel: first_line(Command::new("uname").arg("-r")),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        iperf3: first_line(Command::new("iperf3").arg("--version")),
        haproxy: first_line(Command::new("haproxy").arg("-v")),
        runs,
        seconds,
        minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    let text = report::markdown(&meta, &report::Results { throughput, conn });
    println!("{text}");
    let docs = crate::root().join("docs");
    std::fs::create_dir_all(&docs).with_context(|| format!("creating {}", docs.display()))?;
    let path = docs.join("benchmarks.md");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask bench: wrote {}", path.display());
    Ok(())
}

/// A fresh namespace for one configuration in one run: `lbbench-<our pid>-<phase><tag><run>`
/// (our pid lets a later benchmark clean up after a killed one).
fn namespace(phase: &str, config: Config, run: usize) -> Result<Netns> {
    Netns::create(format!(
        "lbbench-{}-{phase}{}{run}",
        std::process::id(),
        config.tag()
    ))
}

/// Every iperf3 test for every configuration, configurations alternating within each run.
fn throughput_phase(
    env: &Env,
    runs: usize,
    seconds: u32,
) -> Result<Vec<(iperf::Test, ByConfig<iperf::Sample>)>> {
    let mut results: Vec<_> = iperf::Test::ALL
        .iter()
        .map(|t| (*t, ByConfig::new()))
        .collect();
    for run in 1..=runs {
        for config in Config::ALL {
            sys::check_interrupt()?;
            let outcome = (|| -> Result<()> {
                let ns = namespace("t", config, run)?;
                let proxy =
                    configs::start(config, env, &ns, iperf::PROXY_PORT, iperf::BACKEND_PORT)?;
                let pid = proxy.as_ref().map(sys::Proc::pid);
                let port = if proxy.is_some() {
                    iperf::PROXY_PORT
                } else {
                    iperf::BACKEND_PORT
                };
                for (test, by) in results.iter_mut() {
                    let series = by.get_mut(config);
                    match iperf::measure(&ns, &env.dir, *test, seconds, port, pid) {
                        Ok(sample) => {
                            eprintln!(
                                "run {run}/{runs} {:<21} {:<32} {:6.2} Gbit/s  proxy {} CPU-s  machine {:.3} CPU-s/GB",
                                config.name(),
                                test.title(),
                                sample.gbps,
                                sample.proxy_cpu.map_or("–".into(), |c| format!("{c:.2}")),
                                sample.machine_cpu_per_gb
                            );
                            series.samples.push(sample);
                        }
                        Err(err) => {
                            sys::check_interrupt()?;
                            eprintln!(
                                "run {run}/{runs} {} {}: FAILED: {err:#}",
                                config.name(),
                                test.title()
                            );
                            series.failures.push(format!("{err:#}"));
                        }
                    }
                }
                // Drop order: the proxy stops before its namespace is deleted.
                drop(proxy);
                drop(ns);
                Ok(())
            })();
            if let Err(err) = outcome {
                sys::check_interrupt()?;
                // The proxy or namespace did not come up: every test of this run failed.
                eprintln!("run {run}/{runs} {}: FAILED: {err:#}", config.name());
                for (_, by) in results.iter_mut() {
                    by.get_mut(config).failures.push(format!("{err:#}"));
                }
            }
        }
    }
    Ok(results)
}

/// The connection-rate test for every configuration, alternating within each run.
fn connrate_phase(env: &Env, runs: usize, seconds: u32) -> Result<ByConfig<connrate::Sample>> {
    let mut results = ByConfig::new();
    for run in 1..=runs {
        for config in Config::ALL {
            sys::check_interrupt()?;
            let outcome = (|| -> Result<connrate::Sample> {
                let ns = namespace("c", config, run)?;
                // Outlives the run with margin; it is stopped when dropped anyway.
                let echo = connrate::start_echo(&ns, seconds + 60)?;
                let proxy = configs::start(
                    config,
                    env,
                    &ns,
                    connrate::PROXY_PORT,
                    connrate::BACKEND_PORT,
                )?;
                let pid = proxy.as_ref().map(sys::Proc::pid);
                let port = if proxy.is_some() {
                    connrate::PROXY_PORT
                } else {
                    connrate::BACKEND_PORT
                };
                let sample = connrate::measure(&ns, &env.dir, seconds, port, pid);
                drop(proxy);
                drop(echo);
                drop(ns);
                sample
            })();
            match outcome {
                Ok(sample) => {
                    eprintln!(
                        "run {run}/{runs} {:<21} connection rate {:8.0}/s  proxy {} CPU-s  machine {:.1} CPU-µs/conn  {} failed",
                        config.name(),
                        sample.rate,
                        sample.proxy_cpu.map_or("–".into(), |c| format!("{c:.2}")),
                        sample.machine_cpu_us,
                        sample.errors
                    );
                    results.get_mut(config).samples.push(sample);
                }
                Err(err) => {
                    sys::check_interrupt()?;
                    eprintln!(
                        "run {run}/{runs} {} connection rate: FAILED: {err:#}",
                        config.name()
                    );
                    results.get_mut(config).failures.push(format!("{err:#}"));
                }
            }
            // Let the machine settle between configurations (sockets closing, workers idling).
            sys::sleep(Duration::from_millis(200))?;
        }
    }
    Ok(results)
}

/// Installs iperf3 and HAProxy from Debian when missing (apt lists refreshed only then).
fn ensure_tools() -> Result<()> {
    let present = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = [("iperf3", "--version"), ("haproxy", "-v")]
        .into_iter()
        .filter(|(program, arg)| !present(program, arg))
        .map(|(program, _)| program)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask bench: installing {}", missing.join(" "));
    crate::run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing),
    )
}

/// Builds the release lb and returns its path.
fn build_lb() -> Result<PathBuf> {
    let root = crate::root();
    crate::run_cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "lb-user",
    ]))
    .context("building lb")?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let lb = target.join("release").join("lb");
    if !lb.exists() {
        bail!("{} is missing after the build", lb.display());
    }
    Ok(lb)
}

/// The first line a command prints, or "unknown" (for the report header only).
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
