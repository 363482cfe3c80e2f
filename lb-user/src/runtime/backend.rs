//! A backend's runtime object: its configuration, balancer (with each server's live state),
//! and counters, created once so that the connect path does no label lookup.
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use crate::{
    balance::{Balancer, ServerLive},
    config::{Backend, Server},
    metrics::{BackendLabels, Metrics, ServerLabels, ServerPathLabels, UnservedLabels},
};

/// A backend while lb runs.
pub struct BackendRt {
    pub config: Backend,
    pub balancer: Balancer,
    /// Per server of `config.servers`, same order.
    pub servers: Vec<ServerRt>,
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

/// A server's counters (its live state is the balancer's [`ServerLive`]).
pub struct ServerRt {
    /// `lb_backend_connections_total` and `lb_backend_connect_errors_total`.
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

impl BackendRt {
    pub fn new(backend: Backend, metrics: &Metrics) -> BackendRt {
        let labels = |s: &Server| ServerLabels {
            backend: backend.name.clone(),
            server: s.name.clone(),
        };
        let servers = backend
            .servers
            .iter()
            .map(|s| {
                let labels = labels(s);
                ServerRt {
                    connections: metrics.server_connections.get_or_create(&labels).clone(),
                    connect_errors: metrics.connect_errors.get_or_create(&labels).clone(),
                    check_failures: metrics.check_failures.get_or_create(&labels).clone(),
                    user_bytes: server_bytes(metrics, &labels, "user"),
                    kernel_bytes: server_bytes(metrics, &labels, "kernel"),
                    tls_failures: metrics.server_tls_failures.get_or_create(&labels).clone(),
                }
            })
            .collect();
        let balancer = Balancer::new(
            &backend,
            backend.servers.iter().map(|s| {
                let labels = labels(s);
                (
                    metrics.server_active.get_or_create(&labels).clone(),
                    metrics.server_up.get_or_create(&labels).clone(),
                )
            }),
        );
        BackendRt {
            balancer,
            servers,
            retries: metrics
                .retries
                .get_or_create(&BackendLabels::of(&backend))
                .clone(),
            unserved: Unserved {
                no_server: unserved(metrics, &backend, "no_server"),
                connect_failed: unserved(metrics, &backend, "connect_failed"),
                queue_timeout: unserved(metrics, &backend, "queue_timeout"),
            },
            queued: metrics.queued.get_or_create(&BackendLabels::of(&backend)).clone(),
            config: backend,
        }
    }

    /// Server `index`: its configuration, live state and counters.
    pub fn server(&self, index: usize) -> (&Server, &ServerLive, &ServerRt) {
        (
            &self.config.servers[index],
            &self.balancer.servers()[index],
            &self.servers[index],
        )
    }
}

/// One `lb_backend_unserved_total` series. (Its own statement: the family's lock guard that
/// `get_or_create` returns lives to the end of the statement, and a second `get_or_create` on
/// the same family within it would wait for that guard forever.)
fn unserved(metrics: &Metrics, backend: &Backend, reason: &'static str) -> Counter {
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
