//! The measurement loops: for each run, every configuration in turn (so drift over the
//! benchmark affects all of them alike), each in a fresh network namespace.
//!
//! A configuration that fails (proxy does not start, crashes, a test errors) is recorded as a
//! failure and the benchmark goes on; only Ctrl-C stops it.
use super::{
    configs::{self, Config, Env, Proxy},
    connrate, iperf,
    stats::{ByConfig, Series},
    sys::{self, Netns},
};
use anyhow::Result;
use std::time::Duration;

/// A fresh namespace for one configuration in one run: `lbbench-<our pid>-<phase><tag><run>`
/// (our pid lets a later benchmark clean up after a killed one).
fn namespace(phase: &str, config: Config, run: usize) -> Result<Netns> {
    Netns::create(format!(
        "lbbench-{}-{phase}{}{run}",
        std::process::id(),
        config.tag()
    ))
}

/// Records a failure, unless it was caused by Ctrl-C, which is returned to stop everything.
fn record_failure<S>(series: &mut Series<S>, what: &str, err: anyhow::Error) -> Result<()> {
    sys::check_interrupt()?;
    eprintln!("{what}: FAILED: {err:#}");
    series.failures.push(format!("{err:#}"));
    Ok(())
}

fn cpu_text(cpu: Option<f64>) -> String {
    cpu.map_or("–".to_string(), |c| format!("{c:.2}"))
}

/// Every iperf3 test for every configuration.
pub fn throughput(
    env: &Env,
    runs: usize,
    seconds: u32,
) -> Result<Vec<(iperf::Test, ByConfig<iperf::Sample>)>> {
    let mut results: Vec<_> = iperf::Test::ALL.iter().map(|t| (*t, ByConfig::new())).collect();
    for run in 1..=runs {
        for config in Config::ALL {
            sys::check_interrupt()?;
            let label = format!("run {run}/{runs} {:<21}", config.name());
            // If the proxy does not start, the closure drops (deletes) the namespace.
            let started = namespace("t", config, run).and_then(|ns| {
                let proxy = configs::start(config, env, &ns, iperf::PROXY_PORT, iperf::BACKEND_PORT)?;
                Ok((ns, proxy))
            });
            let (ns, mut proxy) = match started {
                Ok(started) => started,
                Err(err) => {
                    // Nothing to measure in this run: every test of it failed the same way.
                    for (_, by) in results.iter_mut() {
                        record_failure(by.get_mut(config), &label, anyhow::anyhow!("{err:#}"))?;
                    }
                    continue;
                }
            };
            let port = if proxy.is_some() {
                iperf::PROXY_PORT
            } else {
                iperf::BACKEND_PORT
            };
            for (test, by) in results.iter_mut() {
                let what = format!("{label} {:<32}", test.title());
                let pid = proxy.as_ref().map(Proxy::pid);
                let measured = iperf::measure(&ns, &env.dir, *test, seconds, port, pid)
                    .and_then(|sample| check_alive(&mut proxy).map(|()| sample));
                match measured {
                    Ok(sample) => {
                        eprintln!(
                            "{what} {:6.2} Gbit/s  proxy {} CPU-s  machine {:.3} CPU-s/GB",
                            sample.gbps,
                            cpu_text(sample.proxy_cpu),
                            sample.machine_cpu_per_gb
                        );
                        by.get_mut(config).samples.push(sample);
                    }
                    Err(err) => record_failure(by.get_mut(config), &what, err)?,
                }
            }
            // The proxy stops before its namespace is deleted.
            drop(proxy);
            drop(ns);
        }
    }
    Ok(results)
}

/// The connection-rate test for every configuration.
pub fn connection_rate(env: &Env, runs: usize, seconds: u32) -> Result<ByConfig<connrate::Sample>> {
    let mut results = ByConfig::new();
    for run in 1..=runs {
        for config in Config::ALL {
            sys::check_interrupt()?;
            let label = format!("run {run}/{runs} {:<21} connection rate", config.name());
            match connection_rate_once(env, config, run, seconds) {
                Ok(sample) => {
                    eprintln!(
                        "{label} {:8.0}/s  proxy {} CPU-s  machine {:.1} CPU-µs/conn  {} failed",
                        sample.rate,
                        cpu_text(sample.proxy_cpu),
                        sample.machine_cpu_us,
                        sample.errors
                    );
                    results.get_mut(config).samples.push(sample);
                }
                Err(err) => record_failure(results.get_mut(config), &label, err)?,
            }
            // Let the machine settle between configurations (sockets closing, workers idling).
            sys::sleep(Duration::from_millis(200))?;
        }
    }
    Ok(results)
}

fn connection_rate_once(env: &Env, config: Config, run: usize, seconds: u32) -> Result<connrate::Sample> {
    // Dropped in reverse order: proxy, echo server, then the namespace.
    let ns = namespace("c", config, run)?;
    // It outlives the run with margin and is stopped when dropped anyway.
    let _echo = connrate::start_echo(env, &ns, seconds + 60)?;
    let mut proxy = configs::start(config, env, &ns, connrate::PROXY_PORT, connrate::BACKEND_PORT)?;
    let port = if proxy.is_some() {
        connrate::PROXY_PORT
    } else {
        connrate::BACKEND_PORT
    };
    let sample = connrate::measure(env, &ns, seconds, port, proxy.as_ref().map(Proxy::pid))?;
    check_alive(&mut proxy)?;
    Ok(sample)
}

fn check_alive(proxy: &mut Option<Proxy>) -> Result<()> {
    proxy.as_mut().map_or(Ok(()), Proxy::check_alive)
}
