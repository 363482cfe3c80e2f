//! Wiring: loads the forwarding path, builds the runtime objects ([`crate::runtime`]), binds the
//! listeners and the admin endpoint, starts the session workers, runs an accept loop per
//! listener that hands each connection to a session supervisor on a worker, and stops
//! gracefully.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    accept, admin,
    affinity::{self, AffinityError, CpuAffinity, CpuList},
    bpf::{BpfError, Kernel},
    config::{Config, Forwarding, KernelCongestion, DEFAULT_KERNEL_CONGESTION},
    forward,
    metrics::{ListenerLabels, Metrics, PathLabels},
    runtime::{BackendRt, ListenerRt, ProcessRt, Runtime, Settings, Shared},
    session,
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
/// `timeouts.shutdown_grace`, and closes what is left.
pub async fn run(
    config: Config,
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
    let mut sockets = Vec::new();
    let settings = Settings::of(&config, kernel.is_some());
    let rcvbuf = settings.kernel_rcvbuf;
    for l in &config.listeners {
        let socket = accept::bind(l, rcvbuf).map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        sockets.push(socket);
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
    let grace = config.shutdown_grace;
    let stop_accepting = CancellationToken::new();
    let workers = Arc::new(
        Workers::start(&worker_cpus(&config)?).map_err(|source| StartError::Workers {
            threads: config.threads,
            source,
        })?,
    );
    let shared = Arc::new(Shared {
        settings,
        kernel,
        kernel_congestion,
        metrics,
        user_bytes,
        stopping: stop_accepting.clone(),
        ktls,
    });
    let backends: Vec<Arc<BackendRt>> = config
        .backends
        .iter()
        .map(|b| Arc::new(BackendRt::new(b.clone(), &shared.metrics)))
        .collect();
    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            let tls = l
                .tls
                .as_ref()
                .map(|t| terminator(l, t, &shared.metrics, shared.ktls.as_ref()));
            Arc::new(ListenerRt::new(l.clone(), shared.clone(), backends.clone(), tls))
        })
        .collect();
    let runtime = Arc::new(Runtime {
        process,
        shared,
        listeners,
        backends,
        admin: config.admin.clone(),
    });

    let abort = CancellationToken::new();
    // The admin endpoint stays up while flows drain, so their progress can be watched.
    let stop_admin = CancellationToken::new();
    let sessions = TaskTracker::new();
    let mut acceptors = Vec::new();
    for (listener, socket) in runtime.listeners.iter().zip(sockets) {
        let l = &listener.config;
        let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            "listener `{}` listening on {local} (mode {}{}, backend `{}`)",
            l.name,
            if l.http.is_some() { "http" } else { "tcp" },
            if l.tls.is_some() { " over TLS" } else { "" },
            listener.default_backend().config.name
        );
        acceptors.push(tokio::spawn(accept_loop(
            listener.clone(),
            socket,
            workers.clone(),
            stop_accepting.clone(),
            abort.clone(),
            sessions.clone(),
        )));
    }
    crate::health::spawn(&runtime.backends, &stop_admin);
    crate::reload::watch(&runtime, &stop_admin);
    if let Some(socket) = admin_socket {
        let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!("admin endpoint listening on {local}");
        tokio::spawn(admin::serve(socket, runtime.clone(), stop_admin.clone()));
    }
    tracing::info!("lb ready ({} session thread(s))", workers.len());
    crate::systemd::ready();

    stop.await;
    crate::systemd::stopping();
    stop_accepting.cancel();
    for a in acceptors {
        let _ = a.await;
    }
    sessions.close();
    let open = sessions.len();
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

/// Whether any listener or server speaks TLS.
fn uses_tls(config: &Config) -> bool {
    config.listeners.iter().any(|l| l.tls.is_some())
        || config
            .backends
            .iter()
            .flat_map(|b| &b.servers)
            .any(|s| s.tls.is_some())
}

/// A listener's TLS termination, with its counters.
fn terminator(
    l: &crate::config::Listener,
    settings: &crate::config::ListenerTls,
    metrics: &Metrics,
    ktls: Option<&Ktls>,
) -> crate::tls::accept::Terminator {
    use crate::{
        metrics::{KtlsHandOffLabels, TlsFailureLabels},
        tls::accept::{Failure, HandOffResult},
    };
    let labels = ListenerLabels {
        listener: l.name.clone(),
    };
    let handshakes = metrics.tls_handshakes.get_or_create(&labels).clone();
    let failures = Failure::ALL.map(|f| {
        let labels = TlsFailureLabels {
            listener: l.name.clone(),
            reason: f.name(),
        };
        let counter = metrics.tls_failures.get_or_create(&labels).clone();
        counter
    });
    let handoffs = HandOffResult::ALL.map(|r| {
        let labels = KtlsHandOffLabels {
            listener: l.name.clone(),
            result: r.name(),
        };
        let counter = metrics.ktls_handoffs.get_or_create(&labels).clone();
        counter
    });
    let kernel = match ktls {
        Some(Ktls::Available(ciphers)) => Some(*ciphers),
        _ => None,
    };
    crate::tls::accept::Terminator::new(settings, handshakes, failures, kernel, handoffs)
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

/// Accepts connections while below the listener's maxconn and spawns a session for each on the
/// next worker.
async fn accept_loop(
    listener: Arc<ListenerRt>,
    socket: accept::Listening,
    workers: Arc<Workers>,
    stop: CancellationToken,
    abort: CancellationToken,
    sessions: TaskTracker,
) {
    let l = &listener.config;
    let slots = Arc::new(Semaphore::new(l.maxconn as usize));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds or memory: pause instead of spinning on the error.
                    tracing::warn!(listener = %l.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        listener.connections.inc();
        let (listener, abort) = (listener.clone(), abort.clone());
        let session = async move {
            let accepted = match accept::configure(&listener.config, stream, peer) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = %listener.config.name, client = %peer, "cannot configure accepted socket: {e}");
                    return;
                }
            };
            let active = listener.active.clone();
            active.inc();
            tokio::select! {
                _ = session::run(listener, accepted) => {}
                _ = abort.cancelled() => {}
            }
            active.dec();
            drop(permit);
        };
        sessions.spawn_on(session, workers.next());
    }
}
