//! Wiring: loads the forwarding path, binds the listeners and the admin endpoint, starts the
//! session workers, runs an accept loop per listener that hands each connection to a session
//! supervisor on a worker, and stops gracefully.
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    accept, admin,
    affinity::{self, AffinityError, CpuAffinity, CpuList},
    balance::Balancer,
    bpf::{BpfError, Kernel},
    config::{Config, Forwarding, KernelCongestion, DEFAULT_KERNEL_CONGESTION},
    forward,
    metrics::{
        BackendLabels, ListenerLabels, Metrics, PathLabels, ResponseLabels, ServerLabels, ServerPathLabels,
        UnservedLabels, STATUS_CLASSES,
    },
    session,
    tls::ktls::Ktls,
    workers::Workers,
};

/// Everything sessions share.
pub struct Proxy {
    pub config: Config,
    /// Per backend of `config.backends`, same order.
    pub backends: Vec<BackendState>,
    /// The loaded BPF program when flows are forwarded by the kernel.
    pub kernel: Option<Kernel>,
    /// The congestion control set on kernel flows' sockets (`tune.kernel_congestion`, checked
    /// against the kernel at start); `None` keeps the system's.
    pub kernel_congestion: Option<String>,
    pub metrics: Arc<Metrics>,
    /// `lb_forwarded_bytes_total{path="user"}`, held to avoid a label lookup per copy.
    pub user_bytes: Counter,
    /// Per listener of `config.listeners`: `lb_dropped_bytes_total{listener}`.
    pub dropped: Vec<Counter>,
    /// Per listener, for `mode: http` ones: `lb_http_responses_total{listener,code}` by
    /// [`crate::metrics::status_class`], held to avoid a label lookup per response.
    pub http_responses: Vec<Option<[Counter; 5]>>,
    /// Cancelled when lb starts to stop (SIGTERM): the listeners stop accepting, and HTTP
    /// sessions close their kept-alive connections (HAProxy's soft-stop): an idle one at once,
    /// a busy one after its response, which says `Connection: close`.
    pub stopping: CancellationToken,
    /// Per listener of `config.listeners`: its TLS termination, for listeners with `tls:`.
    pub tls: Vec<Option<crate::tls::accept::Terminator>>,
    /// Whether the kernel offers kTLS (checked at start when TLS is configured).
    pub ktls: Option<Ktls>,
}

impl Proxy {
    /// The counters of server `index` of backend `backend`.
    pub fn server_counters(&self, backend: usize, index: usize) -> &ServerCounters {
        &self.backends[backend].servers[index]
    }

    /// Where a flow to that server counts the bytes lb copies.
    pub fn byte_counters(&self, backend: usize, index: usize) -> crate::forward::ByteCounters<'_> {
        crate::forward::ByteCounters {
            total: &self.user_bytes,
            server: &self.server_counters(backend, index).user_bytes,
        }
    }

    /// SO_RCVBUF for both sockets of every flow when the kernel path is there
    /// (`tune.kernel_rcvbuf`), set before the handshake (on the listening socket, which
    /// accepted sockets inherit, and on the server socket before it connects), so that it bounds what a
    /// braked direction holds however the flow reached the kernel. (Flows handed over
    /// mid-stream used to keep autotuning: with a fixed buffer about one hand-off in a thousand
    /// repeated bytes, most likely the retransmitted segments the program now trims; the
    /// hand-off test passed 5 runs of 100 hand-offs with it.)
    pub fn kernel_rcvbuf(&self) -> Option<u32> {
        kernel_rcvbuf(self.kernel.as_ref(), &self.config)
    }
}

/// See [`Proxy::kernel_rcvbuf`] (also needed before the proxy exists, to bind the listeners).
fn kernel_rcvbuf(kernel: Option<&Kernel>, config: &Config) -> Option<u32> {
    kernel.and(config.kernel_rcvbuf)
}

/// A backend's runtime state: its balancer and each server's counters (created once, so the
/// connect path does no label lookup).
pub struct BackendState {
    pub balancer: Balancer,
    /// Per server of the backend's config, same order.
    pub servers: Vec<ServerCounters>,
    /// `lb_backend_retries_total`: connect attempts redispatched after a failure.
    pub retries: Counter,
    /// `lb_backend_unserved_total`, by reason.
    pub unserved: Unserved,
    /// `lb_backend_queue`: sessions waiting for a server below its `maxconn`.
    pub queued: Gauge,
}

/// Sessions the backend could give no server to (503 in HTTP mode, a closed connection in
/// TCP mode).
pub struct Unserved {
    /// No server took new flows.
    pub no_server: Counter,
    /// Every connect attempt failed (retries included).
    pub connect_failed: Counter,
    /// Every server stayed at its `maxconn` for `timeouts.queue`.
    pub queue_timeout: Counter,
}

/// `lb_backend_connections_total` and `lb_backend_connect_errors_total` of one server.
pub struct ServerCounters {
    pub connections: Counter,
    pub connect_errors: Counter,
    /// `lb_health_check_failures_total`.
    pub check_failures: Counter,
    /// `lb_server_forwarded_bytes_total{path="user"}` and `{path="kernel"}`.
    pub user_bytes: Counter,
    pub kernel_bytes: Counter,
    /// `lb_server_tls_failures_total`: TLS handshakes with the server that failed.
    pub tls_failures: Counter,
}

impl BackendState {
    fn new(backend: &crate::config::Backend, metrics: &Metrics) -> BackendState {
        let servers = backend
            .servers
            .iter()
            .map(|s| {
                let labels = ServerLabels {
                    backend: backend.name.clone(),
                    server: s.name.clone(),
                };
                ServerCounters {
                    connections: metrics.server_connections.get_or_create(&labels).clone(),
                    connect_errors: metrics.connect_errors.get_or_create(&labels).clone(),
                    check_failures: metrics.check_failures.get_or_create(&labels).clone(),
                    user_bytes: server_bytes(metrics, &labels, "user"),
                    kernel_bytes: server_bytes(metrics, &labels, "kernel"),
                    tls_failures: metrics.server_tls_failures.get_or_create(&labels).clone(),
                }
            })
            .collect();
        BackendState {
            balancer: Balancer::new(
                backend,
                backend.servers.iter().map(|s| {
                    let labels = ServerLabels {
                        backend: backend.name.clone(),
                        server: s.name.clone(),
                    };
                    (
                        metrics.server_active.get_or_create(&labels).clone(),
                        metrics.server_up.get_or_create(&labels).clone(),
                    )
                }),
            ),
            servers,
            retries: metrics.retries.get_or_create(&BackendLabels::of(backend)).clone(),
            unserved: Unserved {
                no_server: unserved(metrics, backend, "no_server"),
                connect_failed: unserved(metrics, backend, "connect_failed"),
                queue_timeout: unserved(metrics, backend, "queue_timeout"),
            },
            queued: metrics.queued.get_or_create(&BackendLabels::of(backend)).clone(),
        }
    }
}

/// One `lb_backend_unserved_total` series. (Its own statement: the family's lock guard that
/// `get_or_create` returns lives to the end of the statement, and a second `get_or_create` on
/// the same family within it would wait for that guard forever.)
fn unserved(metrics: &Metrics, backend: &crate::config::Backend, reason: &'static str) -> Counter {
    let counter = metrics
        .unserved
        .get_or_create(&UnservedLabels::of(backend, reason))
        .clone();
    counter
}

/// One `lb_server_forwarded_bytes_total` series (a statement of its own: see [`unserved`]).
fn server_bytes(metrics: &Metrics, server: &ServerLabels, path: &'static str) -> Counter {
    let labels = ServerPathLabels {
        backend: server.backend.clone(),
        server: server.server.clone(),
        path,
    };
    let counter = metrics.server_bytes.get_or_create(&labels).clone();
    counter
}

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
    let dropped = config
        .listeners
        .iter()
        .map(|l| {
            let labels = ListenerLabels {
                listener: l.name.clone(),
            };
            metrics.dropped_bytes.get_or_create(&labels).clone()
        })
        .collect();
    let http_responses = config
        .listeners
        .iter()
        .map(|l| {
            l.http.as_ref().map(|_| {
                STATUS_CLASSES.map(|code| {
                    let labels = ResponseLabels {
                        listener: l.name.clone(),
                        code,
                    };
                    metrics.http_responses.get_or_create(&labels).clone()
                })
            })
        })
        .collect();
    let backends = config
        .backends
        .iter()
        .map(|b| BackendState::new(b, &metrics))
        .collect();
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
    let tls = config
        .listeners
        .iter()
        .map(|l| l.tls.as_ref().map(|t| terminator(l, t, &metrics, ktls.as_ref())))
        .collect();
    let mut sockets = Vec::new();
    let rcvbuf = kernel_rcvbuf(kernel.as_ref(), &config);
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
    let proxy = Arc::new(Proxy {
        config,
        backends,
        kernel,
        kernel_congestion,
        metrics,
        user_bytes,
        dropped,
        http_responses,
        stopping: stop_accepting.clone(),
        tls,
        ktls,
    });

    let abort = CancellationToken::new();
    // The admin endpoint stays up while flows drain, so their progress can be watched.
    let stop_admin = CancellationToken::new();
    let sessions = TaskTracker::new();
    let mut acceptors = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let l = &proxy.config.listeners[i];
        let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            "listener `{}` listening on {local} (mode {}{}, backend `{}`)",
            l.name,
            if l.http.is_some() { "http" } else { "tcp" },
            if l.tls.is_some() { " over TLS" } else { "" },
            proxy.config.backends[l.backend].name
        );
        acceptors.push(tokio::spawn(accept_loop(
            proxy.clone(),
            i,
            socket,
            workers.clone(),
            stop_accepting.clone(),
            abort.clone(),
            sessions.clone(),
        )));
    }
    crate::health::spawn(&proxy, &stop_admin);
    crate::reload::watch(&proxy, &stop_admin);
    if let Some(socket) = admin_socket {
        let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!("admin endpoint listening on {local}");
        tokio::spawn(admin::serve(socket, proxy.clone(), stop_admin.clone()));
    }
    tracing::info!("lb ready ({} session thread(s))", workers.len());

    stop.await;
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
    proxy: Arc<Proxy>,
    index: usize,
    socket: accept::Listening,
    workers: Arc<Workers>,
    stop: CancellationToken,
    abort: CancellationToken,
    sessions: TaskTracker,
) {
    let l = &proxy.config.listeners[index];
    let labels = ListenerLabels {
        listener: l.name.clone(),
    };
    let total = proxy.metrics.connections.get_or_create(&labels).clone();
    let active = proxy.metrics.active.get_or_create(&labels).clone();
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
        total.inc();
        let (proxy, active, abort) = (proxy.clone(), active.clone(), abort.clone());
        let session = async move {
            let l = &proxy.config.listeners[index];
            let accepted = match accept::configure(l, stream, peer) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = %l.name, client = %peer, "cannot configure accepted socket: {e}");
                    return;
                }
            };
            active.inc();
            tokio::select! {
                _ = session::run(proxy, index, accepted) => {}
                _ = abort.cancelled() => {}
            }
            active.dec();
            drop(permit);
        };
        sessions.spawn_on(session, workers.next());
    }
}
