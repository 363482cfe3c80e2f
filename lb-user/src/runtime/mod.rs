//! Runtime state: the objects the stages serve, built from the configuration at start (by the
//! wiring module, [`crate::daemon`]) and at each reload ([`crate::reload`]). A listener's
//! ([`ListenerRt`]) and a backend's ([`BackendRt`], with its servers' [`ServerRt`]) each hold
//! their configuration, counters and live state; what every flow shares (the kernel path,
//! the metrics) is [`Shared`]. A [`Generation`] is the set one configuration made; [`Runtime`]
//! holds the current one, for the parts that look at every listener or backend (admin
//! endpoint, stats, health checks, reloads). A session keeps the generation it started in
//! (its listener, that listener's backends) to its end, so a reload never changes a flow
//! under way. Every stage may use this module; it holds some stages' types (a balancer, a TLS
//! terminator) but calls no stage.
mod backend;
mod listener;
mod process;

use prometheus_client::metrics::counter::Counter;
use std::sync::{Arc, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

pub use backend::{BackendRt, ServerRt, Unserved};
pub use listener::ListenerRt;
pub use process::{ProcessRt, Reload, UpgradeRecord};

/// What operators ask of the running process (SIGHUP, SIGUSR2, the admin endpoint): the wiring
/// module applies each, one at a time.
pub enum Control {
    Reload(crate::reload::Request),
    Upgrade(crate::upgrade::Request),
}

/// Where [`Control`] requests go.
pub type Requests = tokio::sync::mpsc::Sender<Control>;

use crate::{
    bpf::Kernel,
    config::{Admin, Config},
    forward::ByteCounters,
    http::request::Limits,
    metrics::Metrics,
    tls::ktls::Ktls,
};

/// What every flow shares, whatever its listener.
pub struct Shared {
    /// The loaded BPF program when flows are forwarded by the kernel.
    pub kernel: Option<Kernel>,
    /// The congestion control set on kernel flows' sockets (`tune.kernel_congestion`, checked
    /// against the kernel at start); `None` keeps the system's.
    pub kernel_congestion: Option<String>,
    pub metrics: Arc<Metrics>,
    /// `lb_forwarded_bytes_total{path="user"}`, held to avoid a label lookup per copy.
    pub user_bytes: Counter,
    /// Cancelled when lb starts to stop (SIGTERM): the listeners stop accepting, and HTTP
    /// sessions close their kept-alive connections (HAProxy's soft-stop): an idle one at once,
    /// a busy one after its response, which says `Connection: close`.
    pub stopping: CancellationToken,
    /// Whether the kernel offers kTLS (checked at start when TLS is configured).
    pub ktls: Option<Ktls>,
    /// Cancelled when an upgrade moves the kernel flows to a new process (a fresh one then
    /// serves the flows that stay or come back).
    pub moving: Mutex<CancellationToken>,
    /// Where sessions hand the kernel flows they stopped for a move.
    pub moved: tokio::sync::mpsc::UnboundedSender<crate::session::MovedFlow>,
    /// Set when an upgrade's new process took over (before `stopping`): an idle kept-alive
    /// HTTP connection is then not closed at once, but answered once more, with
    /// `Connection: close` (HAProxy's `idle-close-on-response`): a client sending its next
    /// request at that instant would see it fail, and the new process serves what comes next.
    pub upgraded: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// The token kernel flows starting now stop on for a move.
    pub fn moving_token(&self) -> CancellationToken {
        self.moving.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks every kernel flow to stop for a move (the kernel path takes no new flow
    /// meanwhile: one that was setting up when it closed stops at once).
    pub fn move_kernel_flows(&self) {
        self.moving_token().cancel();
    }

    /// The move failed: flows that go on here, and later ones, get a fresh token.
    pub fn stay(&self) {
        *self.moving.lock().unwrap_or_else(|e| e.into_inner()) = CancellationToken::new();
    }
}

/// The process-wide settings of the configuration that flows read (a reload may change them:
/// a flow reads those of its listener's generation).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `forwarding.offload_after`.
    pub offload_after: u64,
    /// `flow_control.max_in_flight`.
    pub max_in_flight: u32,
    /// SO_SNDBUF of a kernel flow's sockets, `tune.kernel_sndbuf` on the running kernel;
    /// `None` keeps autotuning.
    pub kernel_sndbuf: Option<u32>,
    /// SO_RCVBUF for both sockets of every flow when the kernel path is there
    /// (`tune.kernel_rcvbuf`), set before the handshake (on the listening socket, which
    /// accepted sockets inherit, and on the server socket before it connects), so that it
    /// bounds what a braked direction holds however the flow reached the kernel. (Flows handed
    /// over mid-stream used to keep autotuning: with a fixed buffer about one hand-off in a
    /// thousand repeated bytes, most likely the retransmitted segments the program now trims;
    /// the hand-off test passed 5 runs of 100 hand-offs with it.) `None` without the kernel
    /// path.
    pub kernel_rcvbuf: Option<u32>,
    /// `limits:`, bounds on HTTP messages.
    pub limits: Limits,
}

/// The running kernel's release (`uname -r`); empty when it cannot be read.
pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}

impl Settings {
    /// The settings of `config`; `kernel`: whether the kernel path is there.
    pub fn of(config: &Config, kernel: bool) -> Settings {
        Settings {
            offload_after: config.offload_after,
            max_in_flight: config.max_in_flight,
            kernel_sndbuf: config.kernel_sndbuf.on(&kernel_release()),
            kernel_rcvbuf: config.kernel_rcvbuf.filter(|_| kernel),
            limits: config.limits,
        }
    }
}

impl Shared {
    /// Where a flow to `server` counts the bytes lb copies.
    pub fn byte_counters<'a>(&'a self, server: &'a ServerRt) -> ByteCounters<'a> {
        ByteCounters {
            total: &self.user_bytes,
            server: &server.user_bytes,
        }
    }
}

/// Every listener and backend one configuration made.
pub struct Generation {
    /// The configuration as it runs: a reload keeps the running value of what it cannot
    /// change live ([`crate::reload`]).
    pub config: Config,
    pub settings: Arc<Settings>,
    /// Per listener of the configuration, same order.
    pub listeners: Vec<Arc<ListenerRt>>,
    /// Per backend of the configuration, same order.
    pub backends: Vec<Arc<BackendRt>>,
}

impl Generation {
    /// The set `config` makes; `previous`: the running one a reload replaces, whose servers
    /// and listeners of the same names carry on ([`BackendRt::succeed`]).
    pub fn build(config: Config, shared: &Arc<Shared>, previous: Option<&Generation>) -> Generation {
        let settings = Arc::new(Settings::of(&config, shared.kernel.is_some()));
        let backends: Vec<Arc<BackendRt>> = config
            .backends
            .iter()
            .map(|b| {
                let old = previous.and_then(|p| p.backend(&b.name));
                Arc::new(match old {
                    Some(old) => BackendRt::succeed(old, b.clone(), &shared.metrics),
                    None => BackendRt::new(b.clone(), &shared.metrics),
                })
            })
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let old = previous.and_then(|p| p.listener(&l.name));
                Arc::new(ListenerRt::new(
                    l.clone(),
                    shared.clone(),
                    settings.clone(),
                    backends.clone(),
                    old.map(|o| &**o),
                ))
            })
            .collect();
        Generation {
            config,
            settings,
            listeners,
            backends,
        }
    }

    /// The backend named `name`.
    pub fn backend(&self, name: &str) -> Option<&Arc<BackendRt>> {
        self.backends.iter().find(|b| b.config.name == name)
    }

    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerRt>> {
        self.listeners.iter().find(|l| l.config.name == name)
    }
}

/// The running configuration's objects, and the process.
pub struct Runtime {
    pub process: ProcessRt,
    pub shared: Arc<Shared>,
    current: RwLock<Arc<Generation>>,
    /// Where reloads and upgrades are asked for (the wiring module applies them, one at a
    /// time).
    pub control: Requests,
}

impl Runtime {
    pub fn new(process: ProcessRt, shared: Arc<Shared>, first: Generation, control: Requests) -> Runtime {
        Runtime {
            process,
            shared,
            current: RwLock::new(Arc::new(first)),
            control,
        }
    }

    /// The running generation.
    pub fn current(&self) -> Arc<Generation> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `next` the running generation; returns the one it replaces.
    pub fn install(&self, next: Generation) -> Arc<Generation> {
        std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(next),
        )
    }

    /// The admin endpoint's settings as running.
    pub fn admin(&self) -> Option<Admin> {
        self.current().config.admin.clone()
    }
}
