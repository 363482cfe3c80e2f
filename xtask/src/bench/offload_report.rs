//! The offload-share section of the report ([`super::offload`]): one row per peer and whether
//! the targets are met. Every number is measured, a median of measured values, or a ratio.
use super::{
    offload::{Peer, Sample},
    report::num,
    stats::Series,
};
use std::fmt::Write;

const MIB: f64 = (1 << 20) as f64;

fn share(s: &Sample) -> Option<f64> {
    s.share().map(|v| v * 100.0)
}
fn cpu_per_gb(s: &Sample) -> Option<f64> {
    s.cpu_per_gb()
}
fn payload(s: &Sample) -> Option<f64> {
    Some((s.kernel_bytes + s.user_bytes) / 1e6)
}

/// The lowest value of every run (`None` if none was measured).
fn lowest(series: &Series<Sample>, value: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    series.values(value).into_iter().reduce(f64::min)
}

fn highest(series: &Series<Sample>, value: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    series.values(value).into_iter().reduce(f64::max)
}

/// The section, appended to `out`.
pub fn markdown(out: &mut String, results: &[(Peer, Series<Sample>)], runs: usize) {
    let _ = write!(
        out,
        "\n## Offload share: peers that behave like real ones\n\n\
         lb with its defaults (`forwarding: kernel`, `offload_after` 64 KiB, `max_in_flight` \
         16 MiB), a fresh lb for each peer and run, {runs} run(s). *Through the kernel*: the share \
         of payload bytes (both ways) the program forwarded (`lb_forwarded_bytes_total`), median \
         and lowest run. *lb CPU-s per GB*: lb's user + system time (every thread) while the peer \
         ran, per 10⁹ payload bytes; it includes kernel forwarding work that softirqs do in lb's \
         context. *Most in flight*: `lb_flow_most_in_flight_bytes`, the most bytes one flow \
         direction had inside lb at once (unacknowledged by its receiver plus held on its \
         sender's socket) as seen at brakes and throttles; 0: never braked nor throttled (under \
         half the bound). *Late or failed*: flows that took longer than their transfer time plus \
         1 s (10 s when unpaced), or whose bytes differed or were cut; *slowest*: the most a flow \
         took beyond that bound (negative: every flow was early by at least that much).\n\n\
         | peer (per run) | payload MB | through the kernel | lb CPU-s per GB | most in flight (MiB) | flows | late or failed | slowest (s) | runs |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for (peer, series) in results {
        let flows: u64 = series.samples.iter().map(|s| s.flows).sum();
        let bad: u64 = series.samples.iter().map(|s| s.late + s.failed).sum();
        let _ = writeln!(
            out,
            "| {} | {} | {} % ({} %) | {} | {} | {flows} | {bad} | {} | {}/{} |",
            match series.median(|s| s.gbps) {
                Some(g) => format!("{} ({g:.1} Gbit/s)", peer.title()),
                None => peer.title(),
            },
            num(series.median(payload), 0),
            num(series.median(share), 1),
            num(lowest(series, share), 1),
            num(series.median(cpu_per_gb), 3),
            num(highest(series, |s| Some(s.most_in_flight / MIB)), 1),
            highest(series, |s| s.worst_over).map_or("–".to_string(), |v| format!("{v:+.2}")),
            series.samples.len(),
            series.samples.len() + series.failures.len(),
        );
    }
    targets(out, results);
    for (peer, series) in results {
        for failure in &series.failures {
            let _ = writeln!(out, "- {} failed: {}", peer.name(), failure.replace('\n', " / "));
        }
    }
}

/// The targets, judged on every run (not only the median).
fn targets(out: &mut String, results: &[(Peer, Series<Sample>)]) {
    let get = |p: Peer| results.iter().find(|(q, _)| *q == p).map(|(_, s)| s);
    let _ = write!(out, "\nTargets (every run):\n\n");
    let line = |out: &mut String, what: &str, met: Option<bool>| {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        };
        let _ = writeln!(out, "- {what}: {verdict}");
    };
    let every = |p: Peer, ok: &dyn Fn(&Sample) -> bool| {
        get(p)
            .and_then(|s| (!s.samples.is_empty() && s.failures.is_empty()).then(|| s.samples.iter().all(ok)))
    };
    let share_at_least = |min: f64| move |s: &Sample| s.share().is_some_and(|v| v >= min);
    let cpu_at_most = |max: f64| move |s: &Sample| s.cpu_per_gb().is_some_and(|v| v <= max);
    let clean = |s: &Sample| s.late == 0 && s.failed == 0;
    line(
        out,
        "serial echo: no late or failed flow, ≥ 95 % through the kernel",
        every(Peer::SerialEcho, &|s| clean(s) && share_at_least(0.95)(s)),
    );
    line(
        out,
        "reader at 100 MB/s: ≥ 95 % through the kernel, lb ≤ 0.1 CPU-s per GB",
        every(Peer::Paced100, &|s| {
            clean(s) && share_at_least(0.95)(s) && cpu_at_most(0.1)(s)
        }),
    );
    line(
        out,
        "readers at 10 MB/s: ≥ 90 % through the kernel, lb ≤ 0.1 CPU-s per GB",
        every(Peer::Paced10, &|s| {
            clean(s) && share_at_least(0.90)(s) && cpu_at_most(0.1)(s)
        }),
    );
    line(
        out,
        "iperf3, one stream each way: ≥ 99.9 % through the kernel",
        every(Peer::IperfUp, &share_at_least(0.999))
            .zip(every(Peer::IperfDown, &share_at_least(0.999)))
            .map(|(a, b)| a && b),
    );
    line(
        out,
        "every other peer: no late or failed flow",
        [Peer::Pipelined, Peer::BothSlow, Peer::Random]
            .into_iter()
            .map(|p| every(p, &clean))
            .try_fold(true, |all, r| r.map(|r| all && r)),
    );
}
