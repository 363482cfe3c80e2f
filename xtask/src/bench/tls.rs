//! `cargo xtask bench tls`: full TLS handshakes per second and bulk HTTPS throughput through
//! lb (rustls) and HAProxy (Debian's, OpenSSL 3), each terminating TLS in front of the same
//! plain HTTP backend, with the same certificate: ECDSA P-256, then RSA 2048. Configurations
//! alternate within each run, each in a fresh namespace.
//!
//! Handshakes: `xtask bench-tls-client`, 32 loops of connect, full handshake (a new session
//! every time: resumption is off in the client, so neither proxy can resume), one small
//! request with `Connection: close`, read to the end. Bulk: wrk over HTTPS, 32 kept-alive
//! connections fetching 1 MiB responses.
use super::{
    configs::Env,
    http::{haproxy_config, lb_config, parse_wrk, spawn_proxy, start_backend, Program},
    report::{num, ratio, times},
    stats::median,
    sys::{self, CpuMark, Netns, Proc},
};
use anyhow::{bail, Context, Result};
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROXY_PORT: u16 = 17003;
/// The name in the certificates.
const NAME: &str = "bench.test";
const CONCURRENCY: usize = 32;

/// The certificate's key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Key {
    Ecdsa,
    Rsa,
}

impl Key {
    pub const ALL: [Key; 2] = [Key::Ecdsa, Key::Rsa];
    fn name(self) -> &'static str {
        match self {
            Key::Ecdsa => "ECDSA P-256",
            Key::Rsa => "RSA 2048",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Key::Ecdsa => "ec",
            Key::Rsa => "rsa",
        }
    }
    fn newkey(self) -> &'static [&'static str] {
        match self {
            Key::Ecdsa => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
            Key::Rsa => &["-newkey", "rsa:2048"],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Test {
    Handshakes,
    Bulk,
}

impl Test {
    pub const ALL: [Test; 2] = [Test::Handshakes, Test::Bulk];
    fn title(self) -> &'static str {
        match self {
            Test::Handshakes => "full handshakes/s (one small request each)",
            Test::Bulk => "bulk HTTPS MiB/s (1 MiB responses, keep-alive)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Setup {
    Lb,
    Haproxy,
}

impl Setup {
    pub const ALL: [Setup; 2] = [Setup::Lb, Setup::Haproxy];
    fn name(self) -> &'static str {
        match self {
            Setup::Lb => "lb (rustls)",
            Setup::Haproxy => "HAProxy (OpenSSL)",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Setup::Lb => "lb",
            Setup::Haproxy => "hap",
        }
    }
}

/// One measurement: the rate (handshakes/s or MiB/s), its p99 latency, the proxy's CPU.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub rate: f64,
    pub p99_ms: f64,
    pub proxy_cpu: Option<f64>,
    pub errors: u64,
}

type Row = (Key, Test, Setup, Sample);

/// Runs every key × test × configuration, `runs` times; returns the report.
pub fn measure_all(env: &Env, runs: usize, seconds: u32) -> Result<String> {
    let started = Instant::now();
    let certs = Key::ALL.map(|k| make_cert(&env.dir, k));
    let mut rows: Vec<Row> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for run in 1..=runs {
        for (key, cert) in Key::ALL.iter().zip(&certs) {
            let cert = cert.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            for test in Test::ALL {
                for setup in Setup::ALL {
                    sys::check_interrupt()?;
                    let label = format!(
                        "run {run}/{runs} {:<12} {:<18} {:<48}",
                        key.name(),
                        setup.name(),
                        test.title()
                    );
                    match measure_once(env, cert, setup, test, run, seconds) {
                        Ok(s) => {
                            let cpu = s.proxy_cpu.map_or("–".into(), |c| format!("{c:.2}"));
                            eprintln!(
                                "{label} {:9.1}  p99 {:7.2} ms  proxy {cpu} CPU-s  {} errors",
                                s.rate, s.p99_ms, s.errors
                            );
                            rows.push((*key, test, setup, s));
                        }
                        Err(err) => {
                            sys::check_interrupt()?;
                            eprintln!("{label}: FAILED: {err:#}");
                            failures.push(format!(
                                "{} {} {}: {err:#}",
                                key.name(),
                                setup.name(),
                                test.title()
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(markdown(&rows, &failures, runs, seconds, started.elapsed()))
}

/// A certificate for [`NAME`] and its key (PEM), signed by a CA made for the run (`ca`, what
/// the client trusts; its key of the same type), and the certificate and key in one file for
/// HAProxy.
struct Cert {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    combined: PathBuf,
}

fn make_cert(dir: &Path, key: Key) -> Result<Cert> {
    let file = |suffix: &str| dir.join(format!("{}-{suffix}", key.tag()));
    let openssl = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let status = Command::new("openssl")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running openssl")?;
        if !status.success() {
            bail!("openssl {:?} failed for {}", args.first(), key.name());
        }
        Ok(())
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let newkey: Vec<std::ffi::OsString> = key.newkey().iter().map(|a| os(a)).collect();
    let (ca, ca_key) = (file("ca.pem"), file("ca.key"));
    let mut args = vec![
        os("req"),
        os("-x509"),
        os("-nodes"),
        os("-days"),
        os("30"),
        os("-subj"),
        os("/CN=bench CA"),
    ];
    args.extend(newkey.iter().cloned());
    args.extend([
        os("-keyout"),
        ca_key.clone().into(),
        os("-out"),
        ca.clone().into(),
    ]);
    openssl(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())?;
    let (csr, cert, key_file, ext) = (
        file("leaf.csr"),
        file("leaf.pem"),
        file("leaf.key"),
        file("leaf.ext"),
    );
    let mut args = vec![os("req"), os("-nodes"), os("-subj"), os(&format!("/CN={NAME}"))];
    args.extend(newkey.iter().cloned());
    args.extend([
        os("-keyout"),
        key_file.clone().into(),
        os("-out"),
        csr.clone().into(),
    ]);
    openssl(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())?;
    fs::write(
        &ext,
        format!("subjectAltName=DNS:{NAME}\nbasicConstraints=CA:FALSE\n"),
    )?;
    let args = [
        os("x509"),
        os("-req"),
        os("-in"),
        csr.into(),
        os("-CA"),
        ca.clone().into(),
        os("-CAkey"),
        ca_key.into(),
        os("-CAcreateserial"),
        os("-days"),
        os("30"),
        os("-extfile"),
        ext.into(),
        os("-out"),
        cert.clone().into(),
    ];
    openssl(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())?;
    let combined = file("haproxy.pem");
    let mut both = fs::read(&cert)?;
    both.extend(fs::read(&key_file)?);
    fs::write(&combined, both)?;
    Ok(Cert {
        ca,
        cert,
        key: key_file,
        combined,
    })
}

fn measure_once(
    env: &Env,
    cert: &Cert,
    setup: Setup,
    test: Test,
    run: usize,
    seconds: u32,
) -> Result<Sample> {
    let ns = Netns::create(format!("lbbench-{}-t{}{run}", std::process::id(), setup.tag()))?;
    let _backend = start_backend(env, &ns, seconds)?;
    let mut proxy = start_proxy(env, &ns, setup, cert)?;
    let out_path = env.dir.join("tls-client.txt");
    let out = fs::File::create(&out_path)?;
    let mut client = match test {
        Test::Handshakes => {
            let mut c = ns.command(&env.helper.to_string_lossy());
            c.args([
                "bench-tls-client",
                "--port",
                &PROXY_PORT.to_string(),
                "--seconds",
                &seconds.to_string(),
            ])
            .arg("--ca")
            .arg(&cert.ca);
            c
        }
        Test::Bulk => {
            let mut c = ns.command("wrk");
            c.args([
                "-t",
                "2",
                "-c",
                &CONCURRENCY.to_string(),
                "-d",
                &format!("{seconds}s"),
                "--latency",
            ])
            .arg(format!("https://127.0.0.1:{PROXY_PORT}/large"));
            c
        }
    };
    client.stdout(out);
    let pid = Some(proxy.pid());
    let mark = CpuMark::now(pid)?;
    let status = Proc::spawn("client", client)?.wait(Duration::from_secs(u64::from(seconds) + 30))?;
    let (proxy_cpu, _) = mark.since(pid)?;
    if let Some(status) = proxy.exited() {
        bail!("the proxy exited during the test ({status})");
    }
    if !status.success() {
        bail!("the client failed: {status}");
    }
    let text = fs::read_to_string(&out_path)?;
    let mut sample = match test {
        Test::Handshakes => parse_client(&text, seconds)?,
        Test::Bulk => {
            let w = parse_wrk(&text)?;
            // Each response is 1 MiB of body.
            Sample {
                rate: w.rps,
                p99_ms: w.p99_ms,
                proxy_cpu: None,
                errors: w.errors,
            }
        }
    };
    sample.proxy_cpu = proxy_cpu;
    Ok(sample)
}

fn start_proxy(env: &Env, ns: &Netns, setup: Setup, cert: &Cert) -> Result<Proc> {
    let (program, text) = match setup {
        // `bench http`'s configurations, with TLS on the listener.
        Setup::Lb => (
            Program::Lb,
            lb_config(
                PROXY_PORT,
                &format!(
                    "    tls:\n      certificates:\n        - {{ cert: \"{}\", key: \"{}\" }}\n",
                    cert.cert.display(),
                    cert.key.display()
                ),
            ),
        ),
        Setup::Haproxy => (
            Program::Haproxy,
            haproxy_config(
                PROXY_PORT,
                &format!(" ssl crt {} alpn http/1.1", cert.combined.display()),
            ),
        ),
    };
    spawn_proxy(
        env,
        ns,
        program,
        &format!("tls-{}", setup.tag()),
        &text,
        PROXY_PORT,
    )
}

/// Reads `completed=N errors=E p99_ms=X` into handshakes per second.
fn parse_client(text: &str, seconds: u32) -> Result<Sample> {
    let field = |name: &str| -> Option<f64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    let (Some(completed), Some(errors), Some(p99)) = (field("completed"), field("errors"), field("p99_ms"))
    else {
        bail!("unreadable client output: {text}");
    };
    Ok(Sample {
        rate: completed / f64::from(seconds),
        p99_ms: p99,
        proxy_cpu: None,
        errors: errors as u64,
    })
}

/// `xtask bench-tls-client`: [`CONCURRENCY`] loops of a full handshake and one request for
/// `seconds`; prints `completed=N errors=E p99_ms=X` (only exchanges finished in time count).
pub fn handshake_client(port: u16, seconds: u64, ca: &Path) -> Result<()> {
    use tokio_rustls::rustls::{self, client::Resumption, pki_types::pem::PemObject, RootCertStore};
    let mut roots = RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).context("reading the CA")? {
        roots.add(cert.context("reading the CA")?)?;
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    // Every handshake a full one.
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
    let (completed, errors, mut latencies) = runtime.block_on(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let completed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            let (completed, errors, latencies, connector) = (
                completed.clone(),
                errors.clone(),
                latencies.clone(),
                connector.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                // Bounded by the deadline; a failing proxy is paced.
                while tokio::time::Instant::now() < deadline {
                    let started = Instant::now();
                    match tokio::time::timeout_at(deadline, exchange(&connector, port)).await {
                        Ok(Ok(())) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                            mine.push(started.elapsed().as_secs_f64() * 1000.0);
                        }
                        Ok(Err(_)) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(_) => break,
                    }
                }
                latencies.lock().unwrap().extend(mine);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let all = std::mem::take(&mut *latencies.lock().unwrap());
        (
            completed.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
            all,
        )
    });
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    println!("completed={completed} errors={errors} p99_ms={p99:.3}");
    Ok(())
}

/// One connection: a full handshake, `GET /small` asking to close, the whole answer.
async fn exchange(connector: &tokio_rustls::TlsConnector, port: u16) -> std::io::Result<()> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(NAME).expect("a DNS name");
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(format!("GET /small HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::with_capacity(512);
    match tls.read_to_end(&mut answer).await {
        Ok(_) => {}
        // A peer that closed without close_notify after a whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Err(e) => return Err(e),
    }
    if !answer.starts_with(b"HTTP/1.1 200 ") {
        return Err(std::io::Error::other("not a 200"));
    }
    Ok(())
}

fn markdown(rows: &[Row], failures: &[String], runs: usize, seconds: u32, took: Duration) -> String {
    let of = |k: Key, t: Test, s: Setup| -> Vec<Sample> {
        rows.iter()
            .filter(|r| r.0 == k && r.1 == t && r.2 == s)
            .map(|r| r.3)
            .collect()
    };
    let med = |k, t, s, f: fn(&Sample) -> Option<f64>| median(of(k, t, s).iter().filter_map(f).collect());
    let rate = |s: &Sample| Some(s.rate);
    let p99 = |s: &Sample| Some(s.p99_ms);
    let cpu = |s: &Sample| s.proxy_cpu;
    let mut out = String::new();
    let _ = writeln!(out, "# TLS benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `cargo xtask bench tls --runs {runs} --seconds {seconds}` on {}; kernel {}, {} CPUs, {}; lb at {}. The whole benchmark took {:.1} min.\n",
        super::utc_now(),
        super::first_line(Command::new("uname").arg("-r")),
        super::cpus(),
        super::haproxy_version(),
        super::lb_version(),
        took.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        out,
        "How it was measured:\n\
         - Both proxies terminate TLS (TLS 1.3 negotiated, X25519) with the same certificate (made with `openssl` at the start, signed by a CA made with it, whose key is of the same type) in front of the same plain HTTP/1.1 backend (`xtask bench-http-backend`); lb in `mode: http` with its defaults, HAProxy in `mode http` as Debian ships it with `ssl crt ... alpn http/1.1`. Both run one thread per CPU. Loopback in a fresh network namespace for each configuration and run; configurations alternate within each run.\n\
         - Handshakes: `xtask bench-tls-client` (rustls, aws-lc-rs), {CONCURRENCY} loops of TCP connect, a full handshake (client resumption off, so no session is ever resumed), `GET /small` (100 B) with `Connection: close`, read to the end; handshakes/s counts exchanges completed in {seconds} s, p99 is of the whole exchange. The client shares the 2 CPUs with the proxy.\n\
         - Bulk: wrk (OpenSSL), 2 threads, {CONCURRENCY} kept-alive connections, 1 MiB responses; MiB/s is wrk's requests/s (each 1 MiB of body).\n\
         - proxy CPU-s: user + system time of the proxy process while the client ran; per 1000 handshakes, or per GiB moved. Medians of {runs} run(s).\n"
    );
    for key in Key::ALL {
        let _ = writeln!(out, "## {}\n", key.name());
        let _ = writeln!(
            out,
            "| test | lb | HAProxy | lb × HAProxy | p99 ms lb / HAProxy | proxy CPU-s lb / HAProxy | CPU-s per unit lb / HAProxy | errors lb / HAProxy |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for test in Test::ALL {
            let (l, h) = (
                med(key, test, Setup::Lb, rate),
                med(key, test, Setup::Haproxy, rate),
            );
            // CPU-s per 1000 handshakes, or per GiB moved.
            let scale = if test == Test::Handshakes { 1000.0 } else { 1024.0 };
            let per = |s| {
                let values = of(key, test, s)
                    .iter()
                    .filter_map(|x| x.proxy_cpu.map(|c| c / (x.rate * f64::from(seconds)) * scale))
                    .collect();
                median(values)
            };
            let errors = |s| of(key, test, s).iter().map(|x| x.errors).sum::<u64>();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {} / {} |",
                test.title(),
                num(l, 1),
                num(h, 1),
                times(ratio(l, h)),
                num(med(key, test, Setup::Lb, p99), 2),
                num(med(key, test, Setup::Haproxy, p99), 2),
                num(med(key, test, Setup::Lb, cpu), 2),
                num(med(key, test, Setup::Haproxy, cpu), 2),
                num(per(Setup::Lb), 3),
                num(per(Setup::Haproxy), 3),
                errors(Setup::Lb),
                errors(Setup::Haproxy),
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "## Target: handshakes/s ≥ HAProxy's\n\n| certificate | lb × HAProxy | result |\n|---|---|---|"
    );
    for key in Key::ALL {
        let r = ratio(
            med(key, Test::Handshakes, Setup::Lb, rate),
            med(key, Test::Handshakes, Setup::Haproxy, rate),
        );
        let result = match r {
            Some(v) if v >= 1.0 => "met",
            Some(_) => "**not met**",
            None => "not measured",
        };
        let _ = writeln!(out, "| {} | {} | {result} |", key.name(), times(r));
    }
    let _ = writeln!(out, "\n## Every run\n\nIn run order (rate / p99 ms).\n");
    for key in Key::ALL {
        for test in Test::ALL {
            for setup in Setup::ALL {
                let v: Vec<String> = of(key, test, setup)
                    .iter()
                    .map(|s| format!("{:.1} / {:.2}", s.rate, s.p99_ms))
                    .collect();
                let _ = writeln!(
                    out,
                    "- {} {} {}: {}",
                    key.name(),
                    test.title(),
                    setup.name(),
                    v.join(", ")
                );
            }
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "\nFailures:\n");
        for f in failures {
            let _ = writeln!(out, "- {}", f.lines().next().unwrap_or(""));
        }
    }
    out
}
