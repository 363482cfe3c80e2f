//! One iperf3 measurement: a one-shot iperf3 server as the backend, an iperf3 client through
//! the proxy (or straight to the server), and the CPU spent meanwhile.
use super::sys::{CpuMark, Netns, Proc};
use anyhow::{bail, Context, Result};
use std::{fs, path::Path, process::Stdio, time::Duration};

/// The iperf3 server's port inside each namespace.
pub const BACKEND_PORT: u16 = 5201;
/// The proxy's port inside each namespace.
pub const PROXY_PORT: u16 = 15201;

/// One throughput test: how many parallel streams, which way.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Test {
    pub streams: u32,
    /// iperf3 `-R`: the backend sends, the client receives.
    pub reverse: bool,
}

impl Test {
    pub const ALL: [Test; 4] = [
        Test {
            streams: 1,
            reverse: false,
        },
        Test {
            streams: 1,
            reverse: true,
        },
        Test {
            streams: 4,
            reverse: false,
        },
        Test {
            streams: 4,
            reverse: true,
        },
    ];

    pub fn title(self) -> String {
        let way = if self.reverse {
            "b→c (backend sends)"
        } else {
            "c→b (client sends)"
        };
        let streams = if self.streams == 1 {
            "1 stream".to_string()
        } else {
            format!("{} streams", self.streams)
        };
        format!("{streams}, {way}")
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub gbps: f64,
    /// CPU seconds of the proxy process (None: no proxy).
    pub proxy_cpu: Option<f64>,
    /// Busy CPU seconds of the whole machine per GB (1e9 bytes) received.
    pub machine_cpu_per_gb: f64,
}

/// Runs `test` for `seconds` in `ns`, connecting to `port` (the proxy's, or the backend's for
/// direct), and counts the CPU of `proxy_pid` and of the machine while the client runs.
pub fn measure(
    ns: &Netns,
    dir: &Path,
    test: Test,
    seconds: u32,
    port: u16,
    proxy_pid: Option<u32>,
) -> Result<Sample> {
    // A fresh one-shot server per test: a persistent iperf3 server can stay "busy" after a
    // client that failed half-way, which would spoil every later test.
    let mut server_cmd = ns.command("iperf3");
    server_cmd
        .args(["-s", "-1", "-p", &BACKEND_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = Proc::spawn("iperf3 server", server_cmd)?;
    server.wait_listening(BACKEND_PORT)?;

    let out_path = dir.join("iperf3-client.json");
    let out = fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut client_cmd = ns.command("iperf3");
    client_cmd
        .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-J"])
        .args(["-t", &seconds.to_string(), "-P", &test.streams.to_string()])
        .args(if test.reverse { &["-R"][..] } else { &[][..] })
        .stdout(out)
        .stderr(Stdio::null());

    let mark = CpuMark::now(proxy_pid)?;
    let mut client = Proc::spawn("iperf3 client", client_cmd)?;
    // iperf3 itself stops after `seconds`; the margin covers set-up and a slow end.
    let status = client.wait(Duration::from_secs(u64::from(seconds) + 30))?;
    let (proxy_cpu, machine_cpu) = mark.since(proxy_pid)?;

    let text = fs::read_to_string(&out_path).with_context(|| format!("reading {}", out_path.display()))?;
    let (bits_per_second, bytes) = parse(&text).with_context(|| format!("iperf3 client ({status})"))?;
    // The server ends by itself after its one test; give it a moment, then the guard kills it.
    let _ = server.wait(Duration::from_secs(5));
    if bytes <= 0.0 {
        bail!("iperf3 moved no bytes");
    }
    Ok(Sample {
        gbps: bits_per_second / 1e9,
        proxy_cpu,
        machine_cpu_per_gb: machine_cpu / (bytes / 1e9),
    })
}

/// (bits/s, bytes) received, from iperf3's JSON output (`end.sum_received`).
fn parse(text: &str) -> Result<(f64, f64)> {
    let json: serde_json::Value = serde_json::from_str(text).context("iperf3 did not print JSON")?;
    if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    let sum = &json["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second")?;
    let bytes = sum["bytes"].as_f64().context("no end.sum_received.bytes")?;
    Ok((bps, bytes))
}
