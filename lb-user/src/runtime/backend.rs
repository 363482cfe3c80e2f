//! A backend's runtime object: its configuration, balancer (with each server's live state),
//! and counters, created once so that the connect path does no label lookup.
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio_util::sync::CancellationToken;

use crate::{
    balance::{Balancer, ServerLive, Slot},
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
    /// Cancelled when a reload replaces or removes this backend: its health checks stop (the
    /// ones of what replaces it start).
    pub checks: CancellationToken,
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
        let balancer = Balancer::new(
            &backend,
            backend
                .servers
                .iter()
                .map(|s| server_gauges(metrics, &backend, s)),
        );
        BackendRt::with(backend, balancer, metrics)
    }

    /// The backend `backend` as a reload made it, in place of `old` (the running backend of
    /// the same name). A server of the same name stays the same server: it keeps its health,
    /// its sessions and what an operator set at runtime (drain, maintenance, weight), except
    /// for what the file changed: a new `weight` replaces the one set at runtime, a new
    /// `maxconn` applies at once, and a new address starts its health anew. Servers no longer
    /// in the file are retired (no new flows; theirs go on).
    pub fn succeed(old: &BackendRt, backend: Backend, metrics: &Metrics) -> BackendRt {
        let slots: Vec<Slot> = backend
            .servers
            .iter()
            .map(
                |s| match old.config.servers.iter().position(|o| o.name == s.name) {
                    Some(i) => {
                        let (was, live, _) = old.server(i);
                        if was.weight != s.weight {
                            live.set_weight(s.weight);
                        }
                        if was.maxconn != s.maxconn {
                            live.set_maxconn(s.maxconn);
                        }
                        // A new address says nothing of the server's health; nor does what a
                        // check found once no check runs (nothing else would bring it up).
                        if was.address != s.address || backend.health_check.is_none() && !live.is_up() {
                            live.readdress();
                        }
                        Slot::Kept(i)
                    }
                    None => Slot::New(server_gauges(metrics, &backend, s)),
                },
            )
            .collect();
        for (i, was) in old.config.servers.iter().enumerate() {
            if !backend.servers.iter().any(|s| s.name == was.name) {
                old.balancer.servers()[i].retire();
            }
        }
        let balancer = Balancer::succeed(&backend, &old.balancer, slots);
        BackendRt::with(backend, balancer, metrics)
    }

    fn with(backend: Backend, balancer: Balancer, metrics: &Metrics) -> BackendRt {
        let servers = backend
            .servers
            .iter()
            .map(|s| {
                let labels = server_labels(&backend, s);
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
            checks: CancellationToken::new(),
            config: backend,
        }
    }

    /// A reload removed the whole backend: its servers take no new flows (sessions kept alive
    /// across the reload still name it), its checks stop.
    pub fn retire(&self) {
        for live in self.balancer.servers() {
            live.retire();
        }
        self.checks.cancel();
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

fn server_labels(backend: &Backend, s: &Server) -> ServerLabels {
    ServerLabels {
        backend: (&backend.name).into(),
        server: (&s.name).into(),
    }
}

/// A new server's `lb_backend_active_sessions` and `lb_server_up` gauges.
fn server_gauges(metrics: &Metrics, backend: &Backend, s: &Server) -> (Gauge, Gauge) {
    let labels = server_labels(backend, s);
    let active = metrics.server_active.get_or_create(&labels).clone();
    let up = metrics.server_up.get_or_create(&labels).clone();
    (active, up)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{balance::Admin, config::Balance};
    use std::{sync::Arc, time::Duration};

    fn backend(servers: &[(&str, u16, u32)]) -> Backend {
        Backend {
            name: "b".into(),
            balance: Balance::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            server_timeout: Duration::from_secs(1),
            queue_timeout: Duration::from_secs(1),
            retries: 3,
            health_check: None,
            max_consecutive_errors: None,
            servers: servers
                .iter()
                .map(|&(name, port, weight)| Server {
                    name: name.into(),
                    address: ([127, 0, 0, 1], port).into(),
                    weight,
                    maxconn: None,
                    tls: None,
                    send_proxy: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_reload_keeps_each_servers_live_state_unless_the_file_changes_it() {
        let metrics = Metrics::new();
        let old = BackendRt::new(
            backend(&[("a", 1, 1), ("b", 2, 1), ("c", 3, 1), ("gone", 4, 1)]),
            &metrics,
        );
        let live = |rt: &BackendRt, i: usize| rt.balancer.servers()[i].clone();
        let (a, b, c, gone) = (live(&old, 0), live(&old, 1), live(&old, 2), live(&old, 3));
        a.set_admin(Admin::Drain);
        a.set_weight(9);
        b.set_weight(9);
        c.set_up(false);
        let held = old.balancer.pick(
            crate::balance::PickKey {
                client: std::net::Ipv4Addr::LOCALHOST.into(),
                path: None,
            },
            &[0, 1, 2],
        );
        let held = held.lease().expect("`gone` takes flows");
        // a: untouched; b: new weight in the file; c: new address; gone: removed; new: added.
        let next = BackendRt::succeed(
            &old,
            backend(&[("new", 5, 1), ("a", 1, 1), ("b", 2, 4), ("c", 6, 1)]),
            &metrics,
        );
        let servers = next.balancer.servers();
        assert!(Arc::ptr_eq(&servers[1], &a) && Arc::ptr_eq(&servers[2], &b) && Arc::ptr_eq(&servers[3], &c));
        assert_eq!(
            (a.admin(), a.weight()),
            (Admin::Drain, 9),
            "what the operator set stays"
        );
        assert_eq!(b.weight(), 4, "the file's new weight wins");
        assert!(c.is_up(), "a new address starts its health anew");
        // The removed server takes no new flow, from either generation; its flow goes on.
        assert_eq!(gone.effective_weight(), 0);
        assert_eq!(gone.active(), 1);
        drop(held);
        assert_eq!(gone.active(), 0);
        assert_eq!(servers[0].weight(), 1);
    }
}
