//! The connection-rate test: many short connections, each 64 bytes out and echoed back.
//!
//! The echo server and the client are this xtask binary re-invoked with hidden subcommands
//! (`bench-echo`, `bench-connect`) inside the benchmark namespace, so they need no extra tool.
//! They run from a copy of the binary ([`Env::helper`]): a cargo build during the benchmark
//! replaces target/debug/xtask.
use super::{
    configs::Env,
    sys::{CpuMark, Netns, Proc},
};
use anyhow::{bail, Context, Result};
use std::{
    fs, io,
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{timeout, timeout_at, Instant},
};

/// The echo server's port inside each namespace.
pub const BACKEND_PORT: u16 = 7001;
/// The proxy's port inside each namespace.
pub const PROXY_PORT: u16 = 17001;
/// Client loops running at once.
pub const CONCURRENCY: usize = 32;
/// Request (and echoed response) size.
const MESSAGE: usize = 64;
/// Upper bound on connections per second, to bound a run by count as well as by time.
const MAX_RATE: u64 = 200_000;

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub rate: f64,
    /// CPU seconds of the proxy process (None: no proxy).
    pub proxy_cpu: Option<f64>,
    /// Busy CPU microseconds of the whole machine per completed connection.
    pub machine_cpu_us: f64,
    /// Connections that failed (refused, reset, wrong echo).
    pub errors: u64,
}

/// Starts the echo server in `ns`; it stops by itself after `lifetime` if not stopped before.
pub fn start_echo(env: &Env, ns: &Netns, lifetime: u32) -> Result<Proc> {
    let mut cmd = ns.command(&env.helper.to_string_lossy());
    cmd.args(["bench-echo", "--port", &BACKEND_PORT.to_string(), "--lifetime"])
        .arg(lifetime.to_string())
        .stdout(Stdio::null());
    let mut echo = Proc::spawn("echo server", cmd)?;
    echo.wait_listening(BACKEND_PORT)?;
    Ok(echo)
}

/// Runs the client in `ns` against `port` for `seconds` and counts CPU meanwhile.
pub fn measure(env: &Env, ns: &Netns, seconds: u32, port: u16, proxy_pid: Option<u32>) -> Result<Sample> {
    let out_path = env.dir.join("connect-client.txt");
    let out = fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut cmd = ns.command(&env.helper.to_string_lossy());
    cmd.args([
        "bench-connect",
        "--port",
        &port.to_string(),
        "--seconds",
        &seconds.to_string(),
    ])
    .stdout(out);
    let mark = CpuMark::now(proxy_pid)?;
    let mut client = Proc::spawn("connection-rate client", cmd)?;
    let status = client.wait(Duration::from_secs(u64::from(seconds) + 30))?;
    let (proxy_cpu, machine_cpu) = mark.since(proxy_pid)?;
    if !status.success() {
        bail!("connection-rate client failed: {status}");
    }
    let text = fs::read_to_string(&out_path).with_context(|| format!("reading {}", out_path.display()))?;
    let field = |name: &str| -> Result<u64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .with_context(|| format!("client output has no {name}: {text:?}"))
    };
    let (completed, errors) = (field("completed")?, field("errors")?);
    if completed == 0 {
        bail!("no connection completed ({errors} errors)");
    }
    Ok(Sample {
        rate: completed as f64 / f64::from(seconds),
        proxy_cpu,
        machine_cpu_us: machine_cpu * 1e6 / completed as f64,
        errors,
    })
}

/// `xtask bench-echo`: accepts, reads 64 bytes, writes them back, closes. Ends after `lifetime`
/// seconds at the latest, so a lost server cannot linger.
pub fn echo_server(port: u16, lifetime: u64) -> Result<()> {
    serve_loopback(port, lifetime, |mut stream| async move {
        let mut buf = [0u8; MESSAGE];
        let _ = timeout(Duration::from_secs(5), async {
            stream.read_exact(&mut buf).await?;
            stream.write_all(&buf).await
        })
        .await;
    })
}

/// Accepts on 127.0.0.1:`port` and runs `handle` on each connection in its own task, for
/// `lifetime` seconds at most (the helper servers of `bench tcp` and `bench idle`).
pub(super) fn serve_loopback<F, Fut>(port: u16, lifetime: u64, handle: F) -> Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("binding 127.0.0.1:{port}"))?;
        let serve = async {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of descriptors or an aborted handshake: pause instead of spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                tokio::spawn(handle(stream));
            }
        };
        let _ = timeout(Duration::from_secs(lifetime), serve).await;
        Ok(())
    })
}

/// `xtask bench-connect`: 32 loops of connect, write 64 B, read them back, close, for
/// `seconds`; prints `completed=N errors=E`. Only connections finished before the deadline count.
pub fn connect_client(port: u16, seconds: u64) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
    let max = MAX_RATE * seconds;
    let (completed, errors) = runtime.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let completed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::with_capacity(CONCURRENCY);
        for _ in 0..CONCURRENCY {
            let (completed, errors) = (completed.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline && completed.load(Ordering::Relaxed) < max {
                    match timeout_at(deadline, one_connection(port)).await {
                        Ok(Ok(())) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            // A refusing proxy must not turn this into a busy loop.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        (completed.load(Ordering::Relaxed), errors.load(Ordering::Relaxed))
    });
    println!("completed={completed} errors={errors}");
    Ok(())
}

async fn one_connection(port: u16) -> io::Result<()> {
    let message = [0x5au8; MESSAGE];
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(&message).await?;
    let mut echoed = [0u8; MESSAGE];
    stream.read_exact(&mut echoed).await?;
    if echoed != message {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}
