//! Wiring: loads the forwarding path, builds the runtime objects ([`crate::runtime`]), binds the
//! listeners and the admin endpoint, starts the session workers and the accept loops
//! ([`acceptors`]), applies reloads ([`crate::reload`]) one at a time, and stops gracefully.
mod acceptors;
mod moves;

use acceptors::Acceptors;
use std::{
    future::Future,
    net::SocketAddr,
    os::fd::AsRawFd,
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
    config::{Config, Forwarding, KernelCongestion, SendBuffer, DEFAULT_KERNEL_CONGESTION},
    forward,
    metrics::{Metrics, PathLabels},
    reload::{Refused, Reloaded},
    runtime::{Control, Generation, ProcessRt, Runtime, Shared, UpgradeRecord},
    tls::ktls::Ktls,
    upgrade::{Inherited, Launch, Reporter, Upgraded},
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
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Listeners(Vec<StartError>),
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

/// Says once in the log which send buffers kernel flows get (`tune.kernel_sndbuf`) on the
/// running kernel, with a warning for a fixed one where `auto` would not fix it.
fn send_buffers(setting: SendBuffer) {
    let release = crate::runtime::kernel_release();
    let on = if release.is_empty() {
        "this kernel (its release is unreadable)".to_string()
    } else {
        format!("Linux {release}")
    };
    match (setting, setting.on(&release)) {
        (SendBuffer::Auto, None) => tracing::info!(
            "kernel flows keep autotuned send buffers on {on} (tune.kernel_sndbuf: auto fixes them from 6.18 on)"
        ),
        (SendBuffer::Set(_), Some(bytes)) if bytes >= 2 << 20 && SendBuffer::Auto.on(&release).is_none() => tracing::warn!(
            "kernel flows' sockets have fixed {} send buffers (tune.kernel_sndbuf) on {on}: before 6.18, fixed send buffers of 2 MiB and more crashed Debian's 6.1 and reset flows on 6.12 under braked bulk traffic; `auto` keeps autotuning there",
            bytesize::ByteSize::b(bytes.into()).display().iec()
        ),
        (_, Some(bytes)) => tracing::info!(
            "kernel flows' sockets have fixed {} send buffers (tune.kernel_sndbuf)",
            bytesize::ByteSize::b(bytes.into()).display().iec()
        ),
        (_, None) => tracing::info!("kernel flows keep autotuned send buffers (tune.kernel_sndbuf)"),
    }
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

/// How lb was started.
pub struct Start {
    /// The configuration's file, read again at each reload and by an upgrade's new process.
    pub path: PathBuf,
    /// How flows are forwarded (`--forwarding`, else the file's).
    pub forwarding: Forwarding,
    /// `lb run --forwarding` as given, passed on to an upgrade's new process.
    pub forwarding_arg: Option<Forwarding>,
    /// The binary an upgrade starts by default: the path this one was started from.
    pub binary: PathBuf,
    /// Started by an upgrade: what the old process handed over, and where to say how the
    /// start went.
    pub upgrade: Option<(Inherited, Reporter)>,
}

/// Runs lb until `stop` resolves (or an upgrade's new process takes over), then stops
/// accepting, lets flows finish for `timeouts.shutdown_grace`, and closes what is left.
pub async fn run(config: Config, mut start: Start, stop: impl Future<Output = ()>) -> Result<(), StartError> {
    let (inherited, mut reporter) = match start.upgrade.take() {
        Some((inherited, reporter)) => (Some(inherited), Some(reporter)),
        None => (None, None),
    };
    let outcome = serve(config, &start, inherited, &mut reporter, stop).await;
    // A new process that could not start tells the old one why (which goes on).
    if let (Err(e), Some(r)) = (&outcome, reporter) {
        r.fail(e.to_string());
    }
    outcome
}

async fn serve(
    config: Config,
    start: &Start,
    inherited: Option<Inherited>,
    reporter: &mut Option<Reporter>,
    stop: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let Start {
        path,
        forwarding,
        forwarding_arg,
        binary,
        upgrade: _,
    } = start;
    let forwarding = *forwarding;
    let process = ProcessRt::new();
    let (mut inherited_listeners, mut inherited_admin, inherited_maps, moved_in) = match inherited {
        Some(i) => {
            process.record_upgrade(UpgradeRecord {
                at: std::time::SystemTime::now(),
                by: "upgrade",
                result: "ok",
                detail: format!(
                    "started by an upgrade of pid {}, {} kernel flow(s) moved in",
                    i.from_pid,
                    i.flows.len()
                ),
            });
            (i.listeners, i.admin, i.maps, i.flows)
        }
        None => (Vec::new(), None, None, Vec::new()),
    };
    let kernel = match (inherited_maps, forwarding) {
        // The old process's maps, program and kernel flows go on here, whatever the file says
        // now (a change of forwarding.mode applies to new flows only through a restart).
        (Some(maps), _) => {
            let used: Vec<u32> = moved_in
                .iter()
                .flat_map(|f| f.moving.state.ends.iter().map(|e| e.tracked.slot))
                .collect();
            Some(Kernel::adopt(maps, &used).map_err(StartError::Kernel)?)
        }
        (None, Forwarding::User) => None,
        (None, Forwarding::Kernel) => Some(Kernel::load().map_err(StartError::Kernel)?),
        (None, Forwarding::Auto) => match Kernel::load() {
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
    if kernel.is_some() {
        send_buffers(config.kernel_sndbuf);
    }
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
            match inherited_admin
                .take()
                .and_then(|fd| same_address(fd, admin.listen))
            {
                Some(socket) => socket,
                None => TcpListener::bind(admin.listen)
                    .await
                    .map_err(|source| StartError::Admin {
                        addr: admin.listen,
                        source,
                    })?,
            },
        ),
        None => None,
    };
    let admin_fd = admin_socket.as_ref().map(|s| s.as_raw_fd());
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
    let (moved_tx, mut moved_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        kernel,
        kernel_congestion,
        metrics,
        user_bytes,
        stopping: stop_accepting.clone(),
        ktls,
        moving: Default::default(),
        moved: moved_tx,
        upgraded: Default::default(),
    });
    let first = Generation::build(config, &shared, None);
    let bound = acceptors
        .bind(
            &first.config.listeners,
            first.settings.kernel_rcvbuf,
            &mut inherited_listeners,
        )
        .map_err(StartError::Listeners)?;
    // Handed-over sockets no listener of this configuration has: closed here (the old
    // process closes its own when it stops accepting).
    drop(inherited_listeners);
    let (control, mut requests) = mpsc::channel(8);
    let runtime = Arc::new(Runtime::new(process, shared, first, control.clone()));
    acceptors.apply(&runtime.current(), bound);
    crate::health::spawn(&runtime.current().backends, &stop_admin);
    crate::reload::watch(control.clone(), &stop_admin);
    crate::upgrade::watch(control, &stop_admin);
    let admin_connections = TaskTracker::new();
    if let Some(socket) = admin_socket {
        let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!("admin endpoint listening on {local}");
        tokio::spawn(admin::serve(
            socket,
            runtime.clone(),
            stop_admin.clone(),
            admin_connections.clone(),
        ));
    }
    tracing::info!("lb ready ({} session thread(s))", workers.len());
    if let Some(r) = reporter.take() {
        // The moved flows go on here once the old process has heard that this one serves
        // (until then it may take them back).
        if r.ready() {
            moves::resume_all(&runtime, moved_in, true, &acceptors);
        } else {
            tracing::error!(
                "{} moved kernel flow(s) not resumed: the old process did not confirm the upgrade",
                moved_in.len()
            );
        }
    }
    crate::systemd::ready();

    // Reloads and upgrades are applied here, one at a time, until lb stops or an upgrade's new
    // process takes over.
    let mut stop = std::pin::pin!(stop);
    let mut successor = None;
    loop {
        let request = tokio::select! {
            () = &mut stop => break,
            Some(request) = requests.recv() => request,
            // A kernel flow that stopped for a move no upgrade took (it stopped after the
            // upgrade gave up waiting): it goes on here.
            Some(flow) = moved_rx.recv() => {
                moves::resume_all(&runtime, vec![flow], false, &acceptors);
                continue;
            }
        };
        match request {
            Control::Reload(request) => {
                crate::systemd::reloading();
                let started = std::time::Instant::now();
                let mut outcome = reload(&runtime, path, &mut acceptors, &stop_admin);
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
            Control::Upgrade(request) => {
                let started = std::time::Instant::now();
                let binary = request.binary.clone().unwrap_or_else(|| binary.clone());
                // The kernel flows stop first, and go with the rest (back here if it fails),
                // to a binary with the same eBPF program and maps only: another stays in
                // this process with them, and this process exits once they end.
                let moving = match &runtime.shared.kernel {
                    Some(_) if !runtime.current().config.upgrade_moves_kernel_flows => false,
                    Some(_) if crate::upgrade::same_abi(&binary).await => true,
                    Some(_) => {
                        tracing::warn!("{} has another eBPF program or map layout (lb abi): kernel flows stay in this process, which exits once they end", binary.display());
                        false
                    }
                    None => false,
                };
                let out = if moving {
                    moves::move_out(&runtime, &mut moved_rx, &acceptors).await
                } else {
                    Ok(Vec::new())
                };
                let outcome = match out {
                    Err(e) => Err(crate::upgrade::Failed { error: e }),
                    Ok(flows) => {
                        let launched = crate::upgrade::launch(Launch {
                            binary: &binary,
                            config: path,
                            forwarding: *forwarding_arg,
                            listeners: acceptors.handed(),
                            admin: admin_fd,
                            maps: runtime
                                .shared
                                .kernel
                                .as_ref()
                                .filter(|_| moving)
                                .map(|k| k.map_fds()),
                            flows: &flows,
                        })
                        .await;
                        match launched {
                            // Their sockets live on in the new process: this one's copies close.
                            Ok(pid) => {
                                tracing::info!("{} kernel flow(s) moved to pid {pid}", flows.len());
                                drop(flows);
                                if let Some(kernel) = runtime.shared.kernel.as_ref().filter(|_| moving) {
                                    kernel.leave_program_attached();
                                }
                                Ok(pid)
                            }
                            Err(e) => {
                                if moving {
                                    moves::move_back(&runtime, flows, &acceptors);
                                }
                                Err(e)
                            }
                        }
                    }
                };
                let outcome = outcome.map(|new_pid| Upgraded {
                    old_pid: std::process::id(),
                    new_pid,
                    binary: binary.display().to_string(),
                    milliseconds: started.elapsed().as_secs_f64() * 1000.0,
                });
                let who = match &request.from {
                    Some(from) => format!("{} from {from}", request.by),
                    None => request.by.to_string(),
                };
                match &outcome {
                    Ok(u) => tracing::info!(
                        "{who}: pid {} ({}) serves now; this process stops accepting and finishes its flows",
                        u.new_pid,
                        u.binary
                    ),
                    Err(e) => {
                        tracing::error!("{who}: {e}");
                        runtime.process.record_upgrade(UpgradeRecord {
                            at: std::time::SystemTime::now(),
                            by: request.by,
                            result: "failed",
                            detail: e.error.clone(),
                        });
                    }
                }
                let new_pid = outcome.as_ref().ok().map(|u| u.new_pid);
                let _ = request.answer.send(outcome);
                if let Some(pid) = new_pid {
                    successor = Some(pid);
                    break;
                }
            }
        }
    }
    // Reloads and upgrades asked for from now on are told that lb is stopping.
    drop(requests);
    match successor {
        // systemd follows the new process; this one's stop is not the service's.
        Some(pid) => {
            runtime
                .shared
                .upgraded
                .store(true, std::sync::atomic::Ordering::Relaxed);
            crate::systemd::main_pid(pid);
            // The new process serves the admin endpoint now.
            stop_admin.cancel();
        }
        None => crate::systemd::stopping(),
    }
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
    // Answers being written (an upgrade's, say) go out before the process ends.
    admin_connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_connections.wait()).await;
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
        .bind(&plan.config.listeners, rcvbuf, &mut Vec::new())
        .map_err(|errors| Refused {
            errors: errors.iter().map(ToString::to_string).collect(),
        })?;
    let reloaded = plan.reloaded.clone();
    let next = crate::reload::commit(rt, plan, checks);
    acceptors.apply(&next, bound);
    Ok(reloaded)
}

/// The admin socket an upgrade handed over, if it listens where `listen` says (any port, for
/// port 0); else it is closed.
fn same_address(fd: std::os::fd::OwnedFd, listen: SocketAddr) -> Option<TcpListener> {
    let socket = std::net::TcpListener::from(fd);
    let local = socket.local_addr().ok()?;
    let fits = local == listen || (listen.port() == 0 && local.ip() == listen.ip());
    if !fits {
        return None;
    }
    socket.set_nonblocking(true).ok()?;
    TcpListener::from_std(socket).ok()
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
