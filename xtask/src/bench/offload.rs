//! The offload-share table of `bench tcp` (and `bench offload` alone): with lb's defaults
//! (`forwarding: kernel`, a flow handed to the kernel after 64 KiB one way), for peers that
//! behave like real ones (`lb_tests::peers`: a serial echo server, pipelining, paced readers,
//! both sides slow, a thousand random flows) and for iperf3: the share of payload bytes the
//! kernel forwarded, lb's CPU seconds per GB, the most bytes one flow direction had inside lb
//! (`lb_flow_most_in_flight_bytes`), and the flows that were late or failed their check.
//!
//! The peers are this xtask binary re-invoked inside the namespace: `bench-peers` serves every
//! kind on its own port, `bench-peer-client` runs one peer's flows and prints what it saw as one
//! JSON line.
use super::{
    configs::{self, Config, Env},
    iperf,
    stats::Series,
    sys::{self, Netns, Proc},
};
use anyhow::{bail, Context, Result};
use lb_tests::{paced, peers};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::{fs, net::SocketAddr, process::Stdio, sync::atomic::AtomicU64, time::Duration};

/// The peers' first port inside each namespace: serial echo, then pipelined answers, then the
/// streaming server, then the random flows' server.
const PEERS_PORT: u16 = 6100;
/// lb's listener and admin endpoint inside each namespace.
const PROXY_PORT: u16 = 16100;
const ADMIN_PORT: u16 = 19100;
/// An unpaced flow (and a random one) is late after this long: a flow that waits on something
/// that cannot happen waits for lb's idle timeout (20 s here) and is cut.
const UNPACED_DUE: Duration = Duration::from_secs(10);
/// What a paced flow may take beyond its transfer time.
const GRACE: Duration = Duration::from_secs(1);
const MIB: usize = 1 << 20;

/// One peer of the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Peer {
    /// A serial echo server (reads 1 MiB, writes it all back, reads nothing meanwhile).
    SerialEcho,
    /// A server answering 1 KiB requests while the client keeps sending.
    Pipelined,
    /// A streaming server and a reader paced at 100 MB/s.
    Paced100,
    /// The same at 10 MB/s.
    Paced10,
    /// Both sides send and read at 20 MB/s.
    BothSlow,
    /// A thousand flows at once, random sizes both ways, readers that stall and pause.
    Random,
    /// iperf3, one stream: the client sends, or the backend sends.
    IperfUp,
    IperfDown,
}

/// Serial echo flows at once, their size, and rounds per run (so that three runs see over 200
/// flows, as the target asks).
const ECHO_FLOWS: usize = 12;
const ECHO_SIZE: usize = 64 * MIB;
const ECHO_ROUNDS: usize = 6;
const PIPELINED_FLOWS: usize = 4;
const PIPELINED_REQUESTS: usize = 16 * 1024;
const RANDOM_FLOWS: u64 = 1000;

impl Peer {
    pub const ALL: [Peer; 8] = [
        Peer::SerialEcho,
        Peer::Pipelined,
        Peer::Paced100,
        Peer::Paced10,
        Peer::BothSlow,
        Peer::Random,
        Peer::IperfUp,
        Peer::IperfDown,
    ];

    /// The name `bench-peer-client --peer` takes.
    pub fn name(self) -> &'static str {
        match self {
            Peer::SerialEcho => "serial-echo",
            Peer::Pipelined => "pipelined",
            Peer::Paced100 => "paced-100",
            Peer::Paced10 => "paced-10",
            Peer::BothSlow => "both-slow",
            Peer::Random => "random",
            Peer::IperfUp => "iperf3-up",
            Peer::IperfDown => "iperf3-down",
        }
    }

    pub fn from_name(name: &str) -> Result<Peer> {
        Peer::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .with_context(|| format!("unknown peer {name:?}"))
    }

    /// What the table's row says the peer does, per run.
    pub fn title(self) -> String {
        match self {
            Peer::SerialEcho => format!(
                "serial echo: {ECHO_ROUNDS} × {ECHO_FLOWS} flows at once, {} MiB echoed each",
                ECHO_SIZE / MIB
            ),
            Peer::Pipelined => format!(
                "pipelined: {PIPELINED_FLOWS} flows, {} MiB of {} B requests each, answered while sent",
                PIPELINED_REQUESTS * peers::REQUEST / MIB,
                peers::REQUEST
            ),
            Peer::Paced100 => "reader paced at 100 MB/s: 1 flow, 256 MiB streamed".into(),
            Peer::Paced10 => "readers paced at 10 MB/s: 4 flows, 64 MiB streamed each".into(),
            Peer::BothSlow => "both sides at 20 MB/s: 2 flows, 24 MiB each way".into(),
            Peer::Random => format!(
                "{RANDOM_FLOWS} flows at once: random sizes (up to 1 MiB up, 2 MiB down), readers that stall and pause"
            ),
            Peer::IperfUp => "iperf3, 1 stream, client sends".into(),
            Peer::IperfDown => "iperf3, 1 stream, backend sends".into(),
        }
    }

    fn iperf(self) -> Option<iperf::Test> {
        let reverse = match self {
            Peer::IperfUp => false,
            Peer::IperfDown => true,
            _ => return None,
        };
        Some(iperf::Test { streams: 1, reverse })
    }

    /// The peer server's port (iperf3's own for iperf3).
    fn backend(self) -> u16 {
        match self {
            Peer::SerialEcho => PEERS_PORT,
            Peer::Pipelined => PEERS_PORT + 1,
            Peer::Paced100 | Peer::Paced10 | Peer::BothSlow => PEERS_PORT + 2,
            Peer::Random => PEERS_PORT + 3,
            Peer::IperfUp | Peer::IperfDown => iperf::BACKEND_PORT,
        }
    }
}

/// What one run of one peer measured.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Payload bytes lb forwarded, both ways: in the kernel and in userspace.
    pub kernel_bytes: f64,
    pub user_bytes: f64,
    /// lb's CPU seconds (user + system, every thread) while the peer ran.
    pub lb_cpu: f64,
    /// `lb_flow_most_in_flight_bytes` at the end (lb starts afresh for each run).
    pub most_in_flight: f64,
    pub flows: u64,
    /// Flows that took longer than their transfer time plus a second (10 s unpaced).
    pub late: u64,
    /// Flows that failed their check (cut, or other bytes arrived).
    pub failed: u64,
    /// The most a flow took beyond its bound, in seconds (negative: all were early).
    pub worst_over: Option<f64>,
    /// iperf3's throughput (iperf3 only).
    pub gbps: Option<f64>,
}

impl Sample {
    pub fn share(&self) -> Option<f64> {
        let total = self.kernel_bytes + self.user_bytes;
        (total > 0.0).then(|| self.kernel_bytes / total)
    }

    pub fn cpu_per_gb(&self) -> Option<f64> {
        let total = self.kernel_bytes + self.user_bytes;
        (total > 0.0).then(|| self.lb_cpu / (total / 1e9))
    }
}

/// Every peer, `runs` times (each run goes through every peer in turn).
pub fn measure_all(env: &Env, runs: usize, seconds: u32) -> Result<Vec<(Peer, Series<Sample>)>> {
    measure_some(env, &Peer::ALL, runs, seconds)
}

/// [`measure_all`] for `peers` only.
pub fn measure_some(
    env: &Env,
    peers: &[Peer],
    runs: usize,
    seconds: u32,
) -> Result<Vec<(Peer, Series<Sample>)>> {
    let mut results: Vec<(Peer, Series<Sample>)> = peers.iter().map(|p| (*p, Series::default())).collect();
    for run in 1..=runs {
        for (peer, series) in results.iter_mut() {
            sys::check_interrupt()?;
            let label = format!("run {run}/{runs} offload {:<12}", peer.name());
            match measure(env, *peer, run, seconds) {
                Ok(s) => {
                    eprintln!(
                        "{label} kernel {:5.1} %  lb {:.3} CPU-s/GB  most in flight {:.1} MiB  {} flows, {} late, {} failed, worst {:+.2} s{}",
                        s.share().unwrap_or(0.0) * 100.0,
                        s.cpu_per_gb().unwrap_or(0.0),
                        s.most_in_flight / MIB as f64,
                        s.flows,
                        s.late,
                        s.failed,
                        s.worst_over.unwrap_or(0.0),
                        s.gbps.map(|g| format!(", {g:.2} Gbit/s")).unwrap_or_default()
                    );
                    series.samples.push(s);
                }
                Err(err) => {
                    sys::check_interrupt()?;
                    eprintln!("{label}: FAILED: {err:#}");
                    series.failures.push(format!("{err:#}"));
                }
            }
        }
    }
    Ok(results)
}

/// One run of one peer in a fresh namespace with a fresh lb.
fn measure(env: &Env, peer: Peer, run: usize, seconds: u32) -> Result<Sample> {
    let ns = Netns::create(format!(
        "lbbench-{}-o{}{run}",
        std::process::id(),
        Peer::ALL.iter().position(|p| *p == peer).unwrap_or(0)
    ))?;
    let _peers = match peer.iperf() {
        Some(_) => None,
        None => {
            let mut cmd = ns.command(&env.helper.to_string_lossy());
            cmd.args([
                "bench-peers",
                "--port",
                &PEERS_PORT.to_string(),
                "--lifetime",
                "900",
            ])
            .stdout(Stdio::null());
            let mut server = Proc::spawn("peer servers", cmd)?;
            server.wait_listening(peer.backend())?;
            Some(server)
        }
    };
    let mut proxy = configs::launch(Config::LbKernel, env, &ns, PROXY_PORT, &lb_config(peer.backend()))?;
    let pid = proxy.pid();
    let before = Metrics::read(&ns)?;
    let cpu_before = sys::process_cpu_precise(pid)?;
    let outcome = match peer.iperf() {
        Some(test) => {
            let sample = iperf::measure(&ns, &env.dir, test, seconds, PROXY_PORT, Some(pid))?;
            Outcome {
                flows: 1,
                gbps: Some(sample.gbps),
                ..Outcome::default()
            }
        }
        None => run_client(env, &ns, peer)?,
    };
    let lb_cpu = sys::process_cpu_precise(pid)? - cpu_before;
    proxy.check_alive()?;
    // Each peer's and run's log apart (the next lb's log takes the same name): for `--keep`.
    let _ = std::fs::copy(&proxy.log, env.dir.join(format!("lb-{}-{run}.log", peer.name())));
    // And the namespace's TCP counters (zero windows, probes, drops).
    if let Ok(out) = ns.command("nstat").args(["-az"]).output() {
        let _ = std::fs::write(
            env.dir.join(format!("nstat-{}-{run}.txt", peer.name())),
            out.stdout,
        );
    }
    let after = Metrics::read(&ns)?;
    if let Some(error) = &outcome.error {
        eprintln!("offload {}: {error}", peer.name());
    }
    eprintln!(
        "offload {}: {} brakes, {:.1} MB held and copied by lb",
        peer.name(),
        after.brakes - before.brakes,
        (after.held - before.held) / 1e6
    );
    Ok(Sample {
        kernel_bytes: after.kernel - before.kernel,
        user_bytes: after.user - before.user,
        lb_cpu,
        most_in_flight: after.most_in_flight,
        flows: outcome.flows,
        late: outcome.late,
        failed: outcome.failed,
        worst_over: outcome.worst_over,
        gbps: outcome.gbps,
    })
}

fn lb_config(backend: u16) -> String {
    format!(
        "forwarding: kernel
timeouts: {{ connect: 5s, client: 20s, server: 20s }}
admin: {{ listen: 127.0.0.1:{ADMIN_PORT} }}
listeners:
  - name: bench
    bind: 127.0.0.1:{PROXY_PORT}
    mode: tcp
    backend: bench
backends:
  - name: bench
    balance: roundrobin
    servers:
      - {{ name: peer, address: 127.0.0.1:{backend} }}
"
    )
}

/// The counters read from lb's metrics.
struct Metrics {
    kernel: f64,
    user: f64,
    most_in_flight: f64,
    /// Brakes, and the bytes held by them and copied by lb (for the run's log line).
    brakes: f64,
    held: f64,
}

impl Metrics {
    fn read(ns: &Netns) -> Result<Metrics> {
        let out = ns
            .command("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{ADMIN_PORT}/metrics"))
            .output()
            .context("running curl for lb's metrics")?;
        if !out.status.success() {
            bail!(
                "lb's metrics: curl failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |name: &str| -> Result<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
                .with_context(|| format!("lb's metrics have no {name}"))
        };
        Ok(Metrics {
            kernel: value("lb_forwarded_bytes_total{path=\"kernel\"}")?,
            user: value("lb_forwarded_bytes_total{path=\"user\"}").unwrap_or(0.0),
            most_in_flight: value("lb_flow_most_in_flight_bytes")?,
            brakes: value("lb_flow_brakes_total").unwrap_or(0.0),
            held: value("lb_flow_held_bytes_total").unwrap_or(0.0),
        })
    }
}

/// What a peer's client saw (its JSON line).
#[derive(Default, Debug, serde::Serialize, serde::Deserialize)]
struct Outcome {
    flows: u64,
    late: u64,
    failed: u64,
    /// The first failure, if any.
    error: Option<String>,
    /// The most any flow took beyond its bound, in seconds (negative: every flow was early).
    worst_over: Option<f64>,
    /// iperf3's throughput (iperf3 only).
    gbps: Option<f64>,
}

impl Outcome {
    fn add(&mut self, result: Result<Duration, String>, due: Duration) {
        self.flows += 1;
        if let Ok(took) = &result {
            let over = took.as_secs_f64() - due.as_secs_f64();
            self.worst_over = Some(self.worst_over.map_or(over, |w| w.max(over)));
        }
        match result {
            Ok(took) if took > due => self.late += 1,
            Ok(_) => {}
            Err(e) => {
                self.failed += 1;
                self.error.get_or_insert(e);
            }
        }
    }
}

fn run_client(env: &Env, ns: &Netns, peer: Peer) -> Result<Outcome> {
    let out_path = env.dir.join("peer-client.json");
    let out_file = fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut cmd = ns.command(&env.helper.to_string_lossy());
    cmd.args(["bench-peer-client", "--peer", peer.name(), "--port"])
        .arg(PROXY_PORT.to_string())
        .stdout(out_file);
    let mut client = Proc::spawn("peer client", cmd)?;
    // Every flow ends within its own bound; the slowest peer runs for about a minute.
    let status = client.wait(Duration::from_secs(300))?;
    let out = fs::read_to_string(&out_path).with_context(|| format!("reading {}", out_path.display()))?;
    if !status.success() {
        bail!("the {} client failed ({status})", peer.name());
    }
    serde_json::from_str(out.trim()).with_context(|| format!("the {} client printed {out:?}", peer.name()))
}

/// `xtask bench-peers`: serves every peer kind on its own port from `port` on (see
/// [`PEERS_PORT`]) for `lifetime` seconds at most.
pub fn serve(port: u16, lifetime: u64) -> Result<()> {
    raise_file_limit();
    let bind = |offset: u16| {
        peers::bind(SocketAddr::from(([127, 0, 0, 1], port + offset)))
            .with_context(|| format!("binding port {}", port + offset))
    };
    peers::serve_forever(bind(0)?, peers::serial_echo);
    peers::serve_forever(bind(1)?, peers::answer);
    peers::serve_forever(bind(2)?, peers::stream_and_read);
    let random = bind(3)?;
    random.set_nonblocking(true)?;
    let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
    runtime.block_on(async move {
        let l = tokio::net::TcpListener::from_std(random)?;
        let deadline = tokio::time::sleep(Duration::from_secs(lifetime));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return Ok(()),
                accepted = l.accept() => {
                    let (s, _) = accepted?;
                    tokio::spawn(async move { paced::serve(s, &AtomicU64::new(0)).await });
                }
            }
        }
    })
}

/// `xtask bench-peer-client`: runs `peer`'s flows through 127.0.0.1:`port` and prints what it
/// saw as one JSON line.
pub fn client(peer: &str, port: u16) -> Result<()> {
    raise_file_limit();
    let peer = Peer::from_name(peer)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut outcome = Outcome::default();
    let paced = |rate: f64, size: usize| Duration::from_secs_f64(size as f64 / rate) + GRACE;
    match peer {
        Peer::SerialEcho => {
            for round in 0..ECHO_ROUNDS as u64 {
                for r in peers::run_flows(ECHO_FLOWS, |i| {
                    peers::echo_flow(addr, round * 100 + i as u64, ECHO_SIZE)
                }) {
                    outcome.add(r, UNPACED_DUE);
                }
            }
        }
        Peer::Pipelined => {
            for r in peers::run_flows(PIPELINED_FLOWS, |i| {
                peers::answer_flow(addr, 7 + i as u64, PIPELINED_REQUESTS)
            }) {
                outcome.add(r, UNPACED_DUE);
            }
        }
        Peer::Paced100 => {
            let size = 256 * MIB;
            let r = peers::streamed(addr, 1, size, 0, 100e6, 0.0);
            outcome.add(r, paced(100e6, size));
        }
        Peer::Paced10 => {
            let size = 64 * MIB;
            for r in peers::run_flows(4, |i| peers::streamed(addr, i as u64, size, 0, 10e6, 0.0)) {
                outcome.add(r, paced(10e6, size));
            }
        }
        Peer::BothSlow => {
            let size = 24 * MIB;
            for r in peers::run_flows(2, |i| {
                peers::streamed(addr, 10 + i as u64, size, size, 20e6, 20e6)
            }) {
                outcome.add(r, paced(20e6, size));
            }
        }
        Peer::Random => random_flows(addr, &mut outcome)?,
        Peer::IperfUp | Peer::IperfDown => bail!("iperf3 is its own client"),
    }
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(())
}

/// A thousand flows at once against `paced::serve`, with random sizes and readers that stall
/// and pause (as tests/peers.rs runs them). The client checks what it received (length and
/// sha256 of the server's seeded bytes).
fn random_flows(addr: SocketAddr, outcome: &mut Outcome) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
    let mut rng = SmallRng::seed_from_u64(42);
    let reading = |rng: &mut SmallRng| paced::Reading {
        stall_ms: rng.gen_range(0..50),
        burst: (1 << 10, rng.gen_range(16u64 << 10..1 << 20)),
        pause_ms: (0, rng.gen_range(0..20)),
    };
    let specs: Vec<paced::PacedSpec> = (0..RANDOM_FLOWS)
        .map(|seed| paced::PacedSpec {
            up: rng.gen_range(0..1 << 20),
            down: rng.gen_range(0..2 << 20),
            seed,
            client_reads: reading(&mut rng),
            server_reads: reading(&mut rng),
        })
        .collect();
    let results = runtime.block_on(async {
        let tasks: Vec<_> = specs
            .iter()
            .map(|&spec| {
                tokio::spawn(async move {
                    let started = tokio::time::Instant::now();
                    let report = tokio::time::timeout(
                        Duration::from_secs(60),
                        paced::run_client(addr, spec, &AtomicU64::new(0)),
                    )
                    .await
                    .map_err(|_| format!("flow {}: no end after 60 s", spec.seed))?
                    .map_err(|e| format!("flow {}: {e}", spec.seed))?;
                    // What the server sent: its seeded bytes (paced::serve's seed).
                    let expected = paced::write_seeded(
                        &mut tokio::io::sink(),
                        spec.seed ^ 0x5eed,
                        spec.down,
                        &AtomicU64::new(0),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    if (report.received_len, report.received) != (spec.down, expected) {
                        return Err(format!(
                            "flow {}: received other bytes ({} of {})",
                            spec.seed, report.received_len, spec.down
                        ));
                    }
                    Ok(started.elapsed())
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(
                t.await
                    .unwrap_or_else(|e| Err(format!("a flow's task failed: {e}"))),
            );
        }
        results
    });
    for r in results {
        outcome.add(r, UNPACED_DUE);
    }
    Ok(())
}

/// A thousand flows need more descriptors than the usual soft limit of 1024.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
