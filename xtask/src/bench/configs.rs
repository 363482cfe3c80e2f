//! The configurations compared (direct, lb kernel, lb user, HAProxy as shipped and tuned) and
//! how each proxy is configured and started inside a benchmark namespace.
use super::sys::{self, Netns, Proc};
use anyhow::{Context, Result};
use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

/// One way of getting bytes from the client to the backend.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Config {
    Direct,
    /// lb with its defaults: a flow is handed to the kernel once it has moved 64 KiB one way
    /// (`forwarding.offload_after`).
    LbKernel,
    /// lb handing every flow to the kernel at once (`offload_after: 0`).
    LbKernelAtOnce,
    LbUser,
    HaproxyShipped,
    HaproxyTuned,
}

impl Config {
    /// In the order they alternate within a run.
    pub const ALL: [Config; 6] = [
        Config::Direct,
        Config::LbKernel,
        Config::LbKernelAtOnce,
        Config::LbUser,
        Config::HaproxyShipped,
        Config::HaproxyTuned,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::LbKernel => "lb (kernel)",
            Config::LbKernelAtOnce => "lb (kernel, offload 0)",
            Config::LbUser => "lb (user)",
            Config::HaproxyShipped => "HAProxy (as shipped)",
            Config::HaproxyTuned => "HAProxy (tuned)",
        }
    }

    /// Short tag for namespace and file names.
    pub fn tag(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::LbKernel => "kernel",
            Config::LbKernelAtOnce => "kernel0",
            Config::LbUser => "user",
            Config::HaproxyShipped => "hap",
            Config::HaproxyTuned => "hapt",
        }
    }

    pub fn is_haproxy(self) -> bool {
        matches!(self, Config::HaproxyShipped | Config::HaproxyTuned)
    }
}

/// Where things are for starting proxies.
pub struct Env {
    /// Scratch directory for configuration files and logs.
    pub dir: PathBuf,
    /// The release `lb` binary, or why there is none (the build failed): the lb configurations
    /// then fail and the others still run.
    pub lb: Result<PathBuf, String>,
    /// A copy of this xtask binary, for the connection-rate helpers.
    pub helper: PathBuf,
}

/// Starts the proxy of `config` inside `ns`, listening on 127.0.0.1:`listen` and forwarding to
/// 127.0.0.1:`backend`, and waits until it accepts. `None` for [`Config::Direct`].
pub fn start(config: Config, env: &Env, ns: &Netns, listen: u16, backend: u16) -> Result<Option<Proxy>> {
    let text = match config {
        Config::Direct => return Ok(None),
        Config::LbKernel | Config::LbKernelAtOnce | Config::LbUser => lb_config(config, listen, backend),
        Config::HaproxyShipped | Config::HaproxyTuned => haproxy_config(config, listen, backend),
    };
    launch(config, env, ns, listen, &text).map(Some)
}

/// Starts the proxy of `config` (not [`Config::Direct`]) inside `ns` on the configuration
/// `text`, and waits until it accepts on 127.0.0.1:`listen`.
pub fn launch(config: Config, env: &Env, ns: &Netns, listen: u16, text: &str) -> Result<Proxy> {
    let file = if config.is_haproxy() { "cfg" } else { "yaml" };
    let base = format!("{}-{listen}", config.tag());
    let conf = env.dir.join(format!("{base}.{file}"));
    let log = env.dir.join(format!("{base}.log"));
    fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = if config.is_haproxy() {
        let mut cmd = ns.command("haproxy");
        // -db: stay in the foreground, so the child we hold is the proxy itself.
        cmd.arg("-f").arg(&conf).arg("-db");
        cmd
    } else {
        let lb = env
            .lb
            .as_ref()
            .map_err(|err| anyhow::anyhow!("lb did not build: {err}"))?;
        let mut cmd = ns.command(&lb.to_string_lossy());
        cmd.arg("run").arg("-c").arg(&conf);
        cmd
    };
    cmd.stdout(Stdio::null()).stderr(log_file);
    let mut proc = Proc::spawn(config.name(), cmd)?;
    let ready = proc.wait_listening(listen).and_then(|()| {
        if !config.is_haproxy() {
            wait_for_log_line(&log, "listening on")?;
        }
        Ok(())
    });
    ready.with_context(|| {
        format!(
            "{} did not start; its log ends with:\n{}",
            config.name(),
            tail(&log)
        )
    })?;
    Ok(Proxy { config, proc, log })
}

/// A running proxy; stopped when dropped.
pub struct Proxy {
    config: Config,
    proc: Proc,
    pub log: PathBuf,
}

impl Proxy {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Fails if the proxy has exited: a crash must not pass for a slow run.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.proc.exited() {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "{} exited during the test ({status}); its log ends with:\n{}",
                self.config.name(),
                tail(&self.log)
            ),
        }
    }
}

fn lb_config(config: Config, listen: u16, backend: u16) -> String {
    let forwarding = match config {
        Config::LbKernel => "kernel",
        Config::LbKernelAtOnce => "{ mode: kernel, offload_after: 0 }",
        _ => "user",
    };
    format!(
        "forwarding: {forwarding}
timeouts: {{ connect: 5s, client: 60s, server: 60s }}
listeners:
  - name: bench
    bind: 127.0.0.1:{listen}
    mode: tcp
    backend: bench
backends:
  - name: bench
    balance: roundrobin
    servers:
      - {{ name: backend, address: 127.0.0.1:{backend} }}
"
    )
}

/// A minimal `mode tcp` configuration; the tuned one adds what made HAProxy faster here:
/// 256 KiB buffers and splicing between the sockets.
fn haproxy_config(config: Config, listen: u16, backend: u16) -> String {
    let tuned = config == Config::HaproxyTuned;
    let global_tune = if tuned { "    tune.bufsize 262144\n" } else { "" };
    let splice = if tuned { "    option splice-auto\n" } else { "" };
    format!(
        "global
    maxconn 4096
{global_tune}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{splice}
listen bench
    bind 127.0.0.1:{listen}
    server backend 127.0.0.1:{backend}
"
    )
}

/// lb says `listening on` once everything (the BPF program included) is in place, which can be
/// a little after its socket listens. Bounded: 1 s; an lb that never says it is not an error.
pub fn wait_for_log_line(log: &Path, needle: &str) -> Result<()> {
    for _ in 0..20 {
        if fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
            break;
        }
        sys::sleep(Duration::from_millis(50))?;
    }
    Ok(())
}

/// The last lines of a log, for error messages, without terminal colour codes (lb colours its
/// log even into a file).
pub fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}
