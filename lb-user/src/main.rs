//! The `lb` command line.
use anyhow::Context;
use clap::{Parser, Subcommand};
use lb::config::{self, Forwarding};
use std::{path::PathBuf, process::ExitCode};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli_admin;

/// `lb --version`: says whether this binary carries its eBPF program (the tests read it).
const VERSION: &str = if cfg!(lb_no_ebpf) {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (built without its eBPF program: userspace forwarding only)"
    )
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (eBPF sockmap forwarding built in)")
};

#[derive(Parser)]
#[command(
    name = "lb",
    version = VERSION,
    about = "lb: a TCP load balancer whose established flows are forwarded by the kernel (eBPF sockmap)",
    long_about = "lb: a TCP load balancer whose established flows are forwarded by the kernel (eBPF sockmap).\n\n\
        Like HAProxy, lb is driven by one configuration file (YAML here): `lb run -c FILE` is \
        `haproxy -f FILE`, `lb check -c FILE` is `haproxy -c -f FILE`. Listeners (HAProxy's \
        frontends/binds) forward to backends of servers; `timeouts:` holds the defaults. \
        SIGTERM or SIGINT stops accepting and lets live flows finish for `timeouts.shutdown_grace`; \
        SIGHUP (or `lb reload`) reads the configuration file again and applies it, all or nothing; \
        SIGUSR2 (or `lb upgrade`) replaces the process with a new one without refusing a connection.\n\n\
        Logging: RUST_LOG (default `info`), e.g. RUST_LOG=lb=debug."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer (like `haproxy -f FILE`).
    Run {
        /// Configuration file (YAML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// How flows are forwarded; overrides the file's `forwarding:`. `kernel` refuses to
        /// start without BPF, `auto` falls back to userspace with a warning, `user` never loads BPF.
        #[arg(long, value_enum)]
        forwarding: Option<Forwarding>,
        /// Internal to `lb upgrade`: the descriptor the old process hands its sockets over.
        #[arg(long, hide = true, value_name = "FD")]
        upgrade_fd: Option<i32>,
    },
    /// Check a configuration file and exit (like `haproxy -c -f FILE`): 0 when valid, 1 with
    /// every problem as FILE:LINE:COLUMN: message.
    Check {
        /// Configuration file (YAML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show a running lb's listeners, backends and servers (state, last check, sessions,
    /// queue, bytes by kernel and by userspace, errors), from its admin endpoint.
    Stats {
        #[command(flatten)]
        target: cli_admin::Target,
        /// The raw JSON (`GET /stats.json`).
        #[arg(long)]
        json: bool,
    },
    /// Change a server of a running lb at once, without dropping flows (HAProxy's
    /// `set server`): enable, disable (maintenance), drain, or set its weight.
    Server {
        #[command(flatten)]
        target: cli_admin::Target,
        #[command(subcommand)]
        command: cli_admin::ServerCommand,
    },
    /// Make a running lb read its configuration file again and apply it, as SIGHUP does:
    /// listeners, backends, servers, routes, certificates and settings change without cutting
    /// a flow; a file with any error is refused with every FILE:LINE:COLUMN (exit status 1)
    /// and changes nothing.
    Reload {
        #[command(flatten)]
        target: cli_admin::Target,
    },
    /// Internal to `lb upgrade`: the eBPF program and map layout this binary has (kernel flows
    /// move only between binaries with the same).
    #[command(hide = true)]
    Abi,
    /// Replace a running lb with a new process (as SIGUSR2 does): the binary lb was started
    /// from, or --binary, reads the file and takes over the listening sockets (no connection
    /// refused) and every kernel-forwarded flow; the old process finishes the rest and exits.
    /// If the new one cannot start, the old one goes on and this says why (exit status 1).
    Upgrade {
        #[command(flatten)]
        target: cli_admin::Target,
        /// The new binary (default: the path the running lb was started from).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: OK ({} listener(s), {} backend(s))",
                    config.display(),
                    c.listeners.len(),
                    c.backends.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Stats { target, json } => report(cli_admin::stats(&target, json)),
        Command::Server { target, command } => report(cli_admin::server(&target, &command)),
        Command::Reload { target } => report(cli_admin::reload(&target)),
        Command::Abi => {
            println!("{}", lb::upgrade::abi());
            ExitCode::SUCCESS
        }
        Command::Upgrade { target, binary } => report(cli_admin::upgrade(&target, binary.as_deref())),
        Command::Run {
            config,
            forwarding,
            upgrade_fd,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                // Colours only for a person at a terminal, not in files or pipes.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            match run(config, forwarding, upgrade_fd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Exit status of a command for a running lb; its error on stderr.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf, forwarding_arg: Option<Forwarding>, upgrade_fd: Option<i32>) -> anyhow::Result<()> {
    // Before anything can fail: an upgrade's old process waits to hear why.
    let upgrade = upgrade_fd
        .map(|fd| lb::upgrade::receive(fd).context("reading the old process's hand-over"))
        .transpose()?;
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            if let Some((_, reporter)) = upgrade {
                reporter.fail(e.to_string());
            }
            anyhow::bail!("{e}");
        }
    };
    let forwarding = forwarding_arg.unwrap_or(config.forwarding);
    // The path this binary was started from, now: an upgrade starts whatever is there then.
    let binary = std::env::current_exe().context("finding lb's own binary")?;
    // The main runtime runs the accept loops, the admin endpoint and the kernel's event readers;
    // sessions run on the workers that `daemon::run` starts (`tune.threads`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut signals = lb::shutdown::Signals::install().context("installing SIGTERM/SIGINT handlers")?;
        let stop = async move {
            let name = signals.received().await;
            tracing::info!("{name} received: stopping");
        };
        let start = lb::daemon::Start {
            path,
            forwarding,
            forwarding_arg,
            binary,
            upgrade,
        };
        lb::daemon::run(config, start, stop)
            .await
            .map_err(anyhow::Error::from)
    })
}
