//! Runtime state: the objects the stages serve, built by the wiring module ([`crate::daemon`])
//! from the configuration. A listener's ([`ListenerRt`]) and a backend's ([`BackendRt`], with
//! its servers' [`ServerRt`]) each hold their configuration, counters and live state; what
//! every flow shares (the kernel path, the metrics, process-wide settings) is [`Shared`];
//! [`Runtime`] is the whole set, for the parts that look at every listener or backend (admin
//! endpoint, stats, health checks, reloads). Every stage may use this module; it holds some
//! stages' types (a balancer, a TLS terminator) but calls no stage.
mod backend;
mod listener;
mod process;

use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use backend::{BackendRt, ServerRt, Unserved};
pub use listener::ListenerRt;
pub use process::{ProcessRt, Reload};

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
    pub settings: Settings,
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
}

/// The process-wide settings of the configuration that flows read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `forwarding.offload_after`.
    pub offload_after: u64,
    /// `flow_control.max_in_flight`.
    pub max_in_flight: u32,
    /// `tune.kernel_sndbuf`.
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

impl Settings {
    /// The settings of `config`; `kernel`: whether the kernel path is there.
    pub fn of(config: &Config, kernel: bool) -> Settings {
        Settings {
            offload_after: config.offload_after,
            max_in_flight: config.max_in_flight,
            kernel_sndbuf: config.kernel_sndbuf,
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

/// Every listener and backend of the running configuration, and the process.
pub struct Runtime {
    pub process: ProcessRt,
    pub shared: Arc<Shared>,
    /// Per listener of the configuration, same order.
    pub listeners: Vec<Arc<ListenerRt>>,
    /// Per backend of the configuration, same order.
    pub backends: Vec<Arc<BackendRt>>,
    /// `admin:`.
    pub admin: Option<Admin>,
}

impl Runtime {
    /// The backend named `name`.
    pub fn backend(&self, name: &str) -> Option<&Arc<BackendRt>> {
        self.backends.iter().find(|b| b.config.name == name)
    }
}
