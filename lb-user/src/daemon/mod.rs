//! Wiring: loads the forwarding path, builds the runtime objects ([`crate::runtime`]), binds the
//! listeners and the admin endpoint, starts the session workers and the accept loops
//! ([`acceptors`]), applies reloads ([`crate::reload`]) one at a time, and stops gracefully.
mod acceptors;

use acceptors::Acceptors;
use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    affinity::{self, AffinityError, CpuAffinity, CpuList},
    bpf::{BpfError, Kernel},
    config::{Config, Forwarding, KernelCongestion, DEFAULT_KERNEL_CONGESTION},
    forward,
    metrics::{Metrics, PathLabels},
    reload::{Refused, Reloaded},
    runtime::{Generation, ProcessRt, Runtime, Shared},
    tls::ktls::Ktls,
    workers::Workers,
};

/// Why lb could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("forwarding: kernel was requested but BPF cannot be used: {0}")]
    Kernel(BpfError),
    #[error("listener `{name}`: cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin endpoint: cannot listen on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start {threads} session thread(s): {source}")]
    Workers { threads: usize, source: std::io::Error },
    #[error(transparent)]
    Affinity(#[from] AffinityError),
    #[error("tune.kernel_congestion: the kernel has no `{name}` congestion control; `sysctl net.ipv4.tcp_available_congestion_control` lists those it has")]
    NoCongestion { name: String },
    #[error("tune.kernel_congestion: cannot set `{name}` on a TCP socket: {source}")]
    Congestion { name: String, source: std::io::Error },
}

/// The congestion control kernel flows' sockets get (`tune.kernel_congestion`), tried on a
/// socket first; said once in the log.
fn congestion(setting: &KernelCongestion) -> Result<Option<String>, StartError> {
    let name = match setting {
        KernelCongestion::System => None,
        KernelCongestion::Default => match forward::kernel::check_congestion(DEFAULT_KERNEL_CONGESTION) {
            Ok(()) => Some(DEFAULT_KERNEL_CONGESTION.to_string()),
            Err(e) => {
                tracing::warn!("the kernel has no {DEFAULT_KERNEL_CONGESTION} congestion control ({e}): kernel flows keep the system's (tune.kernel_congestion)");
                None
            }
        },
        KernelCongestion::Named(name) => {
            forward::kernel::check_congestion(name).map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => StartError::NoCongestion { name: name.clone() },
                _ => StartError::Congestion {
                    name: name.clone(),
                    source,
                },
            })?;
            Some(name.clone())
        }
    };
    match &name {
        Some(name) => {
            tracing::info!("kernel flows use the {name} congestion control (tune.kernel_congestion)")
        }
        None => tracing::info!("kernel flows keep the system's congestion control (tune.kernel_congestion)"),
    }
    Ok(name)
}

/// The CPU each session worker is bound to (`tune.cpu_affinity`), said once in the log.
fn worker_cpus(config: &Config) -> Result<Vec<Option<usize>>, AffinityError> {
    let allowed = match config.cpu_affinity {
        CpuAffinity::Unbound => Vec::new(),
        _ => affinity::allowed().map_err(AffinityError::Allowed)?,
    };
    let plan = config.cpu_affinity.plan(config.threads, &allowed)?;
    let bound: Vec<usize> = plan.iter().flatten().copied().collect();
    if bound.is_empty() {
        tracing::info!(
            threads = config.threads,
            "session threads not bound to CPUs (tune.cpu_affinity)"
        );
    } else {
        tracing::info!(threads = config.threads, cpus = %CpuList(bound), "session threads bound to CPUs (thread i to the i-th listed)");
    }
    Ok(plan)
}

/// Runs lb until `stop` resolves, then stops accepting, lets flows finish for
/// `timeouts.shutdown_grace`, and closes what is left. `path`: the configuration's file, read
/// again at each reload.
pub async fn run(
    config: Config,
    path: PathBuf,
    forwarding: Forwarding,
    stop: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let process = ProcessRt::new();
    let kernel = match forwarding {
        Forwarding::User => None,
        Forwarding::Kernel => Some(Kernel::load().map_err(StartError::Kernel)?),
        Forwarding::Auto => match Kernel::load() {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!("kernel forwarding unavailable, forwarding in userspace: {e}");
                None
            }
        },
    };
    raise_fd_limit(&config);
    let metrics = Metrics::new();
    metrics.kernel_forwarding.set(kernel.is_some() as i64);
    tracing::info!(
        "forwarding established flows {}",
        if kernel.is_some() {
            "in the kernel (sockmap)"
        } else {
            "in userspace"
        }
    );
    let user_bytes = metrics
        .forwarded_bytes
        .get_or_create(&PathLabels { path: "user" })
        .clone();
    let kernel_congestion = match &kernel {
        Some(_) => congestion(&config.kernel_congestion)?,
        None => None,
    };
    let ktls = uses_tls(&config).then(crate::tls::ktls::detect);
    match &ktls {
        Some(Ktls::Available(ciphers)) => {
            metrics.ktls_available.set(1);
            tracing::info!(
                ciphers = %ciphers.names().join(", "),
                "kTLS available: client TLS sessions go to the kernel's TLS after their handshake (listeners with ktls: false excepted)"
            );
        }
        Some(Ktls::Unavailable(why)) => {
            tracing::info!("kTLS unavailable ({why}): rustls encrypts and decrypts every TLS session, flows with a TLS side are forwarded in userspace")
        }
        None => {}
    }
    let admin_socket = match &config.admin {
        Some(admin) => Some(
            TcpListener::bind(admin.listen)
                .await
                .map_err(|source| StartError::Admin {
                    addr: admin.listen,
                    source,
                })?,
        ),
        None => None,
    };
    let stop_accepting = CancellationToken::new();
    let workers = Arc::new(
        Workers::start(&worker_cpus(&config)?).map_err(|source| StartError::Workers {
            threads: config.threads,
            source,
        })?,
    );
    let abort = CancellationToken::new();
    // The admin endpoint stays up while flows drain, so their progress can be watched.
    let stop_admin = CancellationToken::new();
    let sessions = TaskTracker::new();
    let mut acceptors = Acceptors::new(
        workers.clone(),
        stop_accepting.clone(),
        abort.clone(),
        sessions.clone(),
    );
    let shared = Arc::new(Shared {
        kernel,
        kernel_congestion,
        metrics,
        user_bytes,
        stopping: stop_accepting.clone(),
        ktls,
    });
    let first = Generation::build(config, &shared, None);
    let bound = acceptors.bind(&first.config.listeners, first.settings.kernel_rcvbuf)?;
    let (reloads, mut requests) = mpsc::channel(8);
    let runtime = Arc::new(Runtime::new(process, shared, first, reloads.clone()));
    acceptors.apply(&runtime.current(), bound);
    crate::health::spawn(&runtime.current().backends, &stop_admin);
    crate::reload::watch(reloads, &stop_admin);
    if let Some(socket) = admin_socket {
        let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!("admin endpoint listening on {local}");
        tokio::spawn(admin::serve(socket, runtime.clone(), stop_admin.clone()));
    }
    tracing::info!("lb ready ({} session thread(s))", workers.len());
    crate::systemd::ready();

    // Reloads are applied here, one at a time, until lb stops.
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(request) = requests.recv() => {
                crate::systemd::reloading();
                let started = std::time::Instant::now();
                let mut outcome = reload(&runtime, &path, &mut acceptors, &stop_admin);
                // The answer says the removed listeners' sockets are closed.
                acceptors.closed().await;
                if let Ok(r) = &mut outcome {
                    r.milliseconds = started.elapsed().as_secs_f64() * 1000.0;
                }
                crate::reload::record(&runtime, request.by, request.from.as_deref(), &outcome);
                let _ = request.answer.send(outcome);
                // A refused reload leaves lb serving as before.
                crate::systemd::ready();
            }
        }
    }
    // Reloads asked for from now on are told that lb is stopping.
    drop(requests);
    crate::systemd::stopping();
    stop_accepting.cancel();
    acceptors.join().await;
    sessions.close();
    let open = sessions.len();
    let grace = runtime.current().config.shutdown_grace;
    tracing::info!("stopped accepting; {open} flow(s) open, waiting up to {grace:?}");
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!("grace period over; closing {} flow(s)", sessions.len());
        abort.cancel();
        // Aborted sessions close at once; the bound only guards against a stuck one.
        let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
    }
    stop_admin.cancel();
    // The acceptors are gone and the sessions ended or were aborted (what is left, stuck past
    // the bound above, is dropped with its worker's runtime): nothing else holds the workers.
    if let Some(workers) = Arc::into_inner(workers) {
        workers.stop();
    }
    tracing::info!("lb stopped");
    Ok(())
}

/// One reload: the file read again, checked against what runs, new listeners bound, then
/// applied (all or nothing: nothing changes until every step that can fail has passed).
fn reload(
    rt: &Runtime,
    path: &Path,
    acceptors: &mut Acceptors,
    checks: &CancellationToken,
) -> Result<Reloaded, Refused> {
    let config = crate::config::load(path)?;
    let plan = crate::reload::plan(&rt.current(), config);
    let rcvbuf = rt.current().settings.kernel_rcvbuf;
    let bound = acceptors
        .bind(&plan.config.listeners, rcvbuf)
        .map_err(|e| Refused {
            errors: vec![e.to_string()],
        })?;
    let reloaded = plan.reloaded.clone();
    let next = crate::reload::commit(rt, plan, checks);
    acceptors.apply(&next, bound);
    Ok(reloaded)
}

/// Whether any listener or server speaks TLS.
fn uses_tls(config: &Config) -> bool {
    config.listeners.iter().any(|l| l.tls.is_some())
        || config
            .backends
            .iter()
            .flat_map(|b| &b.servers)
            .any(|s| s.tls.is_some())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (a flow needs two fds, its sockets, in
/// either path) and warns when `maxconn` cannot be reached.
fn raise_fd_limit(config: &Config) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    let needed: u64 = config
        .listeners
        .iter()
        .map(|l| 2 * u64::from(l.maxconn))
        .sum::<u64>()
        // The session workers' pollers (an epoll fd and an eventfd each, and a spare), and a
        // margin for the listeners, the admin endpoint and BPF.
        + 3 * config.threads as u64
        + 64;
    if lim.rlim_cur < needed {
        tracing::warn!(
            "open files limit {} is below the {needed} that every listener's maxconn needs; raise it (ulimit -n)",
            lim.rlim_cur
        );
    }
}
