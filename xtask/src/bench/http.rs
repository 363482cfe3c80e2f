//! `cargo xtask bench http`: requests per second and p99 latency with wrk through lb's HTTP mode
//! and HAProxy's (`mode http`), against the backend directly: small and 1 MiB responses on
//! kept-alive connections, and 1 MiB responses on a new connection each (`Connection: close`,
//! where lb hands the body to the kernel). Configurations alternate within each run, each in a
//! fresh namespace.
//!
//! The backend is this xtask binary re-invoked (`bench-http-backend`): a minimal keep-alive
//! HTTP/1.1 responder with canned answers, so that the proxies, not the backend, are measured.
use super::{
    configs::{tail, wait_for_log_line, Env},
    connrate::serve_loopback,
    stats::median,
    sys::{self, CpuMark, Netns, Proc},
};
use anyhow::{bail, Context, Result};
use std::{fs, process::Stdio, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(super) const BACKEND_PORT: u16 = 7002;
const PROXY_PORT: u16 = 17002;
/// wrk's connections and threads.
const CONNECTIONS: u32 = 32;
const THREADS: u32 = 2;
/// Body of the small response.
const SMALL: usize = 100;
const LARGE: usize = 1 << 20;

/// What the client asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Test {
    Small,
    Large,
    /// 1 MiB responses, the client asking each time to close.
    LargeClose,
}

impl Test {
    pub const ALL: [Test; 3] = [Test::Small, Test::Large, Test::LargeClose];

    pub fn title(self) -> &'static str {
        match self {
            Test::Small => "small responses (100 B body), keep-alive",
            Test::Large => "1 MiB responses, keep-alive",
            Test::LargeClose => "1 MiB responses, Connection: close",
        }
    }

    /// Whether the targets apply (they are set for kept-alive connections).
    pub fn targeted(self) -> bool {
        self != Test::LargeClose
    }

    fn path(self) -> &'static str {
        match self {
            Test::Small => "/small",
            Test::Large | Test::LargeClose => "/large",
        }
    }
}

/// The configurations compared, in the order they alternate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Setup {
    Direct,
    Lb,
    Haproxy,
}

impl Setup {
    pub const ALL: [Setup; 3] = [Setup::Direct, Setup::Lb, Setup::Haproxy];

    pub fn name(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Lb => "lb (mode http)",
            Setup::Haproxy => "HAProxy (mode http)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Lb => "lb",
            Setup::Haproxy => "hap",
        }
    }
}

/// One wrk run.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub rps: f64,
    pub p99_ms: f64,
    /// CPU seconds of the proxy (None: no proxy).
    pub proxy_cpu: Option<f64>,
    /// Socket errors plus non-2xx answers.
    pub errors: u64,
}

/// Every sample, by test and configuration, plus what failed.
pub struct Results {
    pub samples: Vec<(Test, Setup, Sample)>,
    pub failures: Vec<(Test, Setup, String)>,
}

impl Results {
    pub fn of(&self, test: Test, setup: Setup) -> Vec<Sample> {
        self.samples
            .iter()
            .filter(|(t, s, _)| *t == test && *s == setup)
            .map(|(_, _, x)| *x)
            .collect()
    }

    pub fn median(&self, test: Test, setup: Setup, value: fn(&Sample) -> Option<f64>) -> Option<f64> {
        median(self.of(test, setup).iter().filter_map(value).collect())
    }
}

/// Runs every test for every configuration, `runs` times.
pub fn measure_all(env: &Env, runs: usize, seconds: u32) -> Result<Results> {
    let mut results = Results {
        samples: Vec::new(),
        failures: Vec::new(),
    };
    for run in 1..=runs {
        for setup in Setup::ALL {
            for test in Test::ALL {
                sys::check_interrupt()?;
                let label = format!("run {run}/{runs} {:<20} {:<42}", setup.name(), test.title());
                match measure_once(env, setup, test, run, seconds) {
                    Ok(s) => {
                        let cpu = s.proxy_cpu.map_or("–".to_string(), |c| format!("{c:.2}"));
                        eprintln!(
                            "{label} {:9.0} req/s  p99 {:7.2} ms  proxy {cpu} CPU-s  {} errors",
                            s.rps, s.p99_ms, s.errors
                        );
                        results.samples.push((test, setup, s));
                    }
                    Err(err) => {
                        sys::check_interrupt()?;
                        eprintln!("{label}: FAILED: {err:#}");
                        results.failures.push((test, setup, format!("{err:#}")));
                    }
                }
            }
        }
    }
    Ok(results)
}

fn measure_once(env: &Env, setup: Setup, test: Test, run: usize, seconds: u32) -> Result<Sample> {
    // Dropped in reverse order: proxy, backend, then the namespace.
    let ns = Netns::create(format!("lbbench-{}-h{}{run}", std::process::id(), setup.tag()))?;
    let _backend = start_backend(env, &ns, seconds)?;
    let mut proxy = start_proxy(env, &ns, setup)?;
    let port = if proxy.is_some() { PROXY_PORT } else { BACKEND_PORT };
    let out_path = env.dir.join("wrk.txt");
    let out = fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut wrk = ns.command("wrk");
    wrk.args(["-t", &THREADS.to_string(), "-c", &CONNECTIONS.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency"])
        .args(if test == Test::LargeClose {
            &["-H", "Connection: close"][..]
        } else {
            &[]
        })
        .arg(format!("http://127.0.0.1:{port}{}", test.path()))
        .stdout(out);
    let pid = proxy.as_ref().map(Proc::pid);
    let mark = CpuMark::now(pid)?;
    let status = Proc::spawn("wrk", wrk)?.wait(Duration::from_secs(u64::from(seconds) + 30))?;
    let (proxy_cpu, _) = mark.since(pid)?;
    if let Some(p) = proxy.as_mut() {
        if let Some(status) = p.exited() {
            bail!("the proxy exited during the test ({status})");
        }
    }
    if !status.success() {
        bail!("wrk failed: {status}");
    }
    let text = fs::read_to_string(&out_path)?;
    let mut sample = parse_wrk(&text)?;
    sample.proxy_cpu = proxy_cpu;
    Ok(sample)
}

/// Starts the proxy of `setup` in `ns` and waits until it accepts; `None` for direct.
fn start_proxy(env: &Env, ns: &Netns, setup: Setup) -> Result<Option<Proc>> {
    let (program, text) = match setup {
        Setup::Direct => return Ok(None),
        Setup::Lb => (Program::Lb, lb_config(PROXY_PORT, "")),
        Setup::Haproxy => (Program::Haproxy, haproxy_config(PROXY_PORT, "")),
    };
    spawn_proxy(
        env,
        ns,
        program,
        &format!("http-{}", setup.tag()),
        &text,
        PROXY_PORT,
    )
    .map(Some)
}

/// `xtask bench-http-backend` in `ns`, on [`BACKEND_PORT`], listening (it ends by itself a
/// minute after the test's `seconds`).
pub(super) fn start_backend(env: &Env, ns: &Netns, seconds: u32) -> Result<Proc> {
    let mut cmd = ns.command(&env.helper.to_string_lossy());
    cmd.args([
        "bench-http-backend",
        "--port",
        &BACKEND_PORT.to_string(),
        "--lifetime",
    ])
    .arg((seconds + 60).to_string())
    .stdout(Stdio::null());
    let mut backend = Proc::spawn("http backend", cmd)?;
    backend.wait_listening(BACKEND_PORT)?;
    Ok(backend)
}

/// Which proxy a benchmark starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Program {
    Lb,
    Haproxy,
}

/// Writes `config` to `env.dir/NAME.yaml` (lb) or `NAME.cfg` (HAProxy), starts the proxy in
/// `ns` with it, its log in `NAME.log`, and waits until it accepts on `port`.
pub(super) fn spawn_proxy(
    env: &Env,
    ns: &Netns,
    program: Program,
    name: &str,
    config: &str,
    port: u16,
) -> Result<Proc> {
    let ext = if program == Program::Lb { "yaml" } else { "cfg" };
    let conf = env.dir.join(format!("{name}.{ext}"));
    let log = env.dir.join(format!("{name}.log"));
    fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
    let log_file = fs::File::create(&log)?;
    let mut cmd = match program {
        Program::Haproxy => {
            let mut cmd = ns.command("haproxy");
            cmd.arg("-f").arg(&conf).arg("-db");
            cmd
        }
        Program::Lb => {
            let lb = env
                .lb
                .as_ref()
                .map_err(|e| anyhow::anyhow!("lb did not build: {e}"))?;
            let mut cmd = ns.command(&lb.to_string_lossy());
            // The access log line per request is what HAProxy's `option httplog` would be;
            // neither proxy logs here (HAProxy has no log target), so both do the same work.
            cmd.env("RUST_LOG", "info,lb::access=off")
                .arg("run")
                .arg("-c")
                .arg(&conf);
            cmd
        }
    };
    cmd.stdout(Stdio::null()).stderr(log_file);
    let what = if program == Program::Lb { "lb" } else { "HAProxy" };
    let mut proc = Proc::spawn(what, cmd)?;
    proc.wait_listening(port)
        .and_then(|()| match program {
            Program::Lb => wait_for_log_line(&log, "listening on"),
            Program::Haproxy => Ok(()),
        })
        .with_context(|| format!("{what} did not start; its log ends with:\n{}", tail(&log)))?;
    Ok(proc)
}

/// lb's defaults, with the forwarding headers both proxies add (X-Forwarded-For), listening on
/// `port`; `listener_yaml`: more keys of the listener (4 spaces in), e.g. a `tls:` block.
pub(super) fn lb_config(port: u16, listener_yaml: &str) -> String {
    format!(
        "forwarding: kernel
timeouts: {{ connect: 5s, client: 60s, server: 60s }}
listeners:
  - name: bench
    bind: 127.0.0.1:{port}
    mode: http
    default_backend: bench
    forwarded: {{ x_forwarded_for: true, x_forwarded_proto: false }}
{listener_yaml}backends:
  - name: bench
    servers:
      - {{ name: backend, address: 127.0.0.1:{BACKEND_PORT} }}
"
    )
}

/// HAProxy's `mode http` as shipped, plus `option forwardfor` (lb adds X-Forwarded-For too),
/// listening on `port`; `bind_options`: what follows the bind's address (` ssl crt ...`).
pub(super) fn haproxy_config(port: u16, bind_options: &str) -> String {
    format!(
        "global
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option forwardfor

listen bench
    bind 127.0.0.1:{port}{bind_options}
    server backend 127.0.0.1:{BACKEND_PORT}
"
    )
}

/// Reads requests/s, the 99th percentile and the errors from wrk's `--latency` output.
pub(super) fn parse_wrk(text: &str) -> Result<Sample> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| duration_ms(v.trim()))
        .with_context(|| format!("no 99% latency in wrk's output:\n{text}"))?;
    // The counts after the colon ("Non-2xx or 3xx responses: 4" holds other digits before it).
    let numbers = |line: &str| -> u64 {
        let counts = line.split_once(':').map_or("", |(_, c)| c);
        counts
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    let errors = text
        .lines()
        .filter(|l| l.contains("Socket errors:") || l.contains("Non-2xx or 3xx responses:"))
        .map(numbers)
        .sum();
    Ok(Sample {
        rps,
        p99_ms: p99,
        proxy_cpu: None,
        errors,
    })
}

/// `583.00us`, `2.10ms`, `1.02s` in milliseconds.
fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// `xtask bench-http-backend`: answers every GET with a canned response (`/large`: 1 MiB,
/// else 100 bytes) on a kept-alive connection, or, when the request asks to close, with
/// `Connection: close` before it closes. Ends after `lifetime` seconds at the latest.
pub fn backend(port: u16, lifetime: u64) -> Result<()> {
    let response = |body: usize, close: bool| {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {body}\r\n{connection}\r\n"
        )
        .into_bytes();
        r.resize(r.len() + body, b'x');
        std::sync::Arc::new(r)
    };
    // [small, large], kept alive and closing.
    let answers = std::sync::Arc::new([
        [response(SMALL, false), response(LARGE, false)],
        [response(SMALL, true), response(LARGE, true)],
    ]);
    serve_loopback(port, lifetime, move |mut stream| {
        let answers = answers.clone();
        async move {
            let _ = stream.set_nodelay(true);
            let mut buf = Vec::with_capacity(8192);
            // Bounded by the backend's lifetime; a connection ends when its client closes, or
            // after an answer to a request that asked to close.
            loop {
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let close = buf[..end]
                        .windows(17)
                        .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
                    let answer = &answers[usize::from(close)][usize::from(buf.starts_with(b"GET /large"))];
                    buf.drain(..end + 4);
                    if stream.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 5s test @ http://127.0.0.1:17002/small
  2 threads and 32 connections
  Latency Distribution
     50%  583.00us
     75%    1.00ms
     90%    1.50ms
     99%    2.10ms
  123456 requests in 5.00s, 20.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  24691.20
Transfer/sec:      4.00MB
";
        let s = parse_wrk(text).unwrap();
        assert_eq!((s.rps, s.p99_ms, s.errors), (24691.20, 2.10, 7));
        assert_eq!(duration_ms("583.00us"), Some(0.583));
        assert_eq!(duration_ms("1.02s"), Some(1020.0));
    }
}
