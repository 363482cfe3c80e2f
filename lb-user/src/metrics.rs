//! Metrics: counters every stage updates, encoded in the Prometheus/OpenMetrics text format for
//! `GET /metrics` on the admin endpoint.
//!
//! Every label value that is not a fixed word of lb's own (the names of listeners, backends and
//! servers) is a [`Name`], escaped as the text format requires: prometheus-client writes label
//! values as they are, and one quote in a name would break the whole scrape.
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::sync::{Arc, Mutex};

use crate::bpf::Kernel;

/// A label value taken from the configuration (a listener's, backend's or server's name).
///
/// Encoded with `\\`, `\"` and `\n` escaped, as the Prometheus and OpenMetrics text formats
/// require. The configuration already refuses names with such characters (HAProxy's rule,
/// [`crate::config`]); this keeps the scrape parseable whatever a name holds.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub String);

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name(s.to_string())
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name(s)
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Name {
        Name(s.clone())
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        let mut rest = self.0.as_str();
        // Plain runs are written whole; only the three characters the format reserves are
        // replaced.
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: Name,
}

impl BackendLabels {
    pub fn of(b: &crate::config::Backend) -> BackendLabels {
        BackendLabels {
            backend: (&b.name).into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnservedLabels {
    pub backend: Name,
    /// `no_server`, `connect_failed` or `queue_timeout`.
    pub reason: &'static str,
}

impl UnservedLabels {
    pub fn of(b: &crate::config::Backend, reason: &'static str) -> UnservedLabels {
        UnservedLabels {
            backend: (&b.name).into(),
            reason,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerPathLabels {
    pub backend: Name,
    pub server: Name,
    /// `kernel` or `user`.
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerStateLabels {
    pub backend: Name,
    pub server: Name,
    /// `UP`, `DOWN`, `DRAIN` or `MAINT`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub backend: Name,
    pub server: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabels {
    /// `kernel_to_user` (a brake, or bytes held for the daemon) or `user_to_kernel`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// [`crate::forward::kernel::Ineligible`]: `ended` (a side had ended its stream or reset,
    /// before or during the hand-off: the kernel takes only ESTABLISHED sockets), `no_slot`
    /// (every control slot in use), `map_full` (the SOCKHASH was full), `no_memory` (the
    /// kernel had no memory for an entry), `insert_failed` (another insert error, not
    /// expected) or `moving` (an upgrade was moving the kernel flows to a new process).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub listener: Name,
    /// Which side caused the end: `client` or `server`.
    pub side: &'static str,
}

/// `lb_reloads_total{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// `lb_tls_handshake_failures_total`: the listener and why ([`crate::tls::accept::Failure`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    pub listener: Name,
    pub reason: &'static str,
}

/// `lb_ktls_handoffs_total`: the listener and what became of the session
/// ([`crate::tls::accept::HandOffResult`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KtlsHandOffLabels {
    pub listener: Name,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub listener: Name,
    /// The status class: `1xx` to `5xx` (HAProxy's `hrsp_*`).
    pub code: &'static str,
}

/// The status classes of `lb_http_responses_total`, in [`status_class`] order.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index of `status`'s class in [`STATUS_CLASSES`].
pub fn status_class(status: u16) -> usize {
    usize::from((status / 100).clamp(1, 5) - 1)
}

/// Every metric lb exports.
pub struct Metrics {
    registry: Registry,
    /// Payload bytes forwarded, both directions together, by path (`kernel`, `user`).
    pub forwarded_bytes: Family<PathLabels, Counter>,
    pub connections: Family<ListenerLabels, Counter>,
    pub active: Family<ListenerLabels, Gauge>,
    pub connect_errors: Family<ServerLabels, Counter>,
    pub server_connections: Family<ServerLabels, Counter>,
    /// Current sessions per server (what `leastconn` and `random` weigh).
    pub server_active: Family<ServerLabels, Gauge>,
    /// 1 for a server's current state, 0 for the others (set at each scrape).
    pub server_state: Family<ServerStateLabels, Gauge>,
    /// Payload bytes per server and path.
    pub server_bytes: Family<ServerPathLabels, Counter>,
    /// Connect attempts redispatched to another server after a failure.
    pub retries: Family<BackendLabels, Counter>,
    /// Sessions that got no server, by reason.
    pub unserved: Family<UnservedLabels, Counter>,
    /// Sessions waiting for a server below its `maxconn`.
    pub queued: Family<BackendLabels, Gauge>,
    /// 1 while a server is healthy (health checks, passive ejection), else 0.
    pub server_up: Family<ServerLabels, Gauge>,
    /// Failed health checks per server.
    pub check_failures: Family<ServerLabels, Counter>,
    pub resets: Family<EndLabels, Counter>,
    pub timeouts: Family<EndLabels, Counter>,
    /// 1 when flows are forwarded by the kernel, 0 when in userspace.
    pub kernel_forwarding: Gauge,
    /// Flows the kernel would not take, forwarded in userspace instead, by reason.
    pub kernel_fallbacks: Family<FallbackLabels, Counter>,
    /// Bytes lb accepted from one side and could not deliver because the other side failed.
    pub dropped_bytes: Family<ListenerLabels, Counter>,
    /// Bytes the verdict program took from a socket beyond what TCP received on it: a segment
    /// handed to the program twice, so the peer got those bytes twice. Expected to stay 0.
    pub kernel_duplicated_bytes: Counter,
    /// HTTP responses sent to clients (from servers or generated by lb), by status class.
    pub http_responses: Family<ResponseLabels, Counter>,
    /// Completed client TLS handshakes, by listener.
    pub tls_handshakes: Family<ListenerLabels, Counter>,
    /// Failed client TLS handshakes, by listener and reason.
    pub tls_failures: Family<TlsFailureLabels, Counter>,
    /// Connections of `accept_proxy` listeners closed for their PROXY header, by listener and
    /// reason (the same labels as TLS failures).
    pub proxy_refused: Family<TlsFailureLabels, Counter>,
    /// Failed TLS handshakes with a server.
    pub server_tls_failures: Family<ServerLabels, Counter>,
    /// 1 when the kernel offers kTLS, 0 when flows with a TLS side are forwarded in userspace.
    pub ktls_available: Gauge,
    /// Client TLS sessions offered to the kernel's TLS after their handshake, by result.
    pub ktls_handoffs: Family<KtlsHandOffLabels, Counter>,
    /// Configuration reloads (SIGHUP, `lb reload`), by result.
    pub reloads: Family<ResultLabels, Counter>,
    kernel: KernelMetrics,
    // Serialises scrapes: kernel counters are folded in by delta.
    scrape: Mutex<()>,
}

impl Metrics {
    /// A reload removed the listener `name`: its series leave the scrape (flows still open on
    /// it count on in counters no scrape shows).
    pub fn forget_listener(&self, name: &str) {
        let listener = ListenerLabels {
            listener: name.into(),
        };
        for family in [&self.connections, &self.dropped_bytes, &self.tls_handshakes] {
            family.remove(&listener);
        }
        self.active.remove(&listener);
        for side in crate::forward::Side::BOTH {
            let labels = EndLabels {
                listener: name.into(),
                side: side.name(),
            };
            self.resets.remove(&labels);
            self.timeouts.remove(&labels);
        }
        for reason in crate::tls::accept::Failure::ALL {
            self.tls_failures.remove(&TlsFailureLabels {
                listener: name.into(),
                reason: reason.name(),
            });
        }
        for reason in crate::proxy_header::receive::Refusal::ALL {
            self.proxy_refused.remove(&TlsFailureLabels {
                listener: name.into(),
                reason: reason.name(),
            });
        }
        for result in crate::tls::accept::HandOffResult::ALL {
            self.ktls_handoffs.remove(&KtlsHandOffLabels {
                listener: name.into(),
                result: result.name(),
            });
        }
        for code in STATUS_CLASSES {
            self.http_responses.remove(&ResponseLabels {
                listener: name.into(),
                code,
            });
        }
    }

    /// A reload removed the server `server` of `backend` (or its whole backend).
    pub fn forget_server(&self, backend: &str, server: &str) {
        let labels = ServerLabels {
            backend: backend.into(),
            server: server.into(),
        };
        for family in [
            &self.connect_errors,
            &self.server_connections,
            &self.check_failures,
            &self.server_tls_failures,
        ] {
            family.remove(&labels);
        }
        self.server_active.remove(&labels);
        self.server_up.remove(&labels);
        for state in crate::balance::State::ALL {
            self.server_state.remove(&ServerStateLabels {
                backend: backend.into(),
                server: server.into(),
                state: state.name(),
            });
        }
        for path in ["user", "kernel"] {
            self.server_bytes.remove(&ServerPathLabels {
                backend: backend.into(),
                server: server.into(),
                path,
            });
        }
    }

    /// A reload removed the backend `name` (its servers are forgotten one by one).
    pub fn forget_backend(&self, name: &str) {
        let labels = BackendLabels { backend: name.into() };
        self.retries.remove(&labels);
        self.queued.remove(&labels);
        for reason in ["no_server", "connect_failed", "queue_timeout"] {
            self.unserved.remove(&UnservedLabels {
                backend: name.into(),
                reason,
            });
        }
    }
}

/// What the verdict program and the kernel path report, read at scrape time.
#[derive(Default)]
struct KernelMetrics {
    redirected_skbs: Counter,
    misses: Counter,
    passed_bytes: Counter,
    empty_drops: Counter,
    untracked: Counter,
    brakes: Counter,
    handoffs: Family<HandoffLabels, Counter>,
    held_bytes: Counter,
    events_lost: Counter,
    trimmed_bytes: Counter,
    untrimmed: Counter,
    flows: Gauge,
    braked_flows: Gauge,
    most_in_flight: Gauge,
    tracked_sockets: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let m = Metrics {
            forwarded_bytes: Family::default(),
            connections: Family::default(),
            active: Family::default(),
            connect_errors: Family::default(),
            server_connections: Family::default(),
            server_active: Family::default(),
            server_state: Family::default(),
            server_bytes: Family::default(),
            retries: Family::default(),
            unserved: Family::default(),
            queued: Family::default(),
            server_up: Family::default(),
            check_failures: Family::default(),
            resets: Family::default(),
            timeouts: Family::default(),
            kernel_forwarding: Gauge::default(),
            kernel_fallbacks: Family::default(),
            dropped_bytes: Family::default(),
            kernel_duplicated_bytes: Counter::default(),
            http_responses: Family::default(),
            tls_handshakes: Family::default(),
            tls_failures: Family::default(),
            server_tls_failures: Family::default(),
            proxy_refused: Family::default(),
            ktls_available: Gauge::default(),
            ktls_handoffs: Family::default(),
            reloads: Family::default(),
            kernel: KernelMetrics::default(),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "lb_forwarded_bytes",
            "Payload bytes forwarded, both directions, by path (kernel or user)",
            m.forwarded_bytes.clone(),
        );
        r.register(
            "lb_http_responses",
            "HTTP responses sent to clients, by listener and status class",
            m.http_responses.clone(),
        );
        r.register(
            "lb_connections",
            "Client connections accepted",
            m.connections.clone(),
        );
        r.register(
            "lb_active_connections",
            "Client connections open now",
            m.active.clone(),
        );
        r.register(
            "lb_backend_connect_errors",
            "Failed connections to a server (refused, timed out, unreachable)",
            m.connect_errors.clone(),
        );
        r.register(
            "lb_backend_connections",
            "Connections established to a server",
            m.server_connections.clone(),
        );
        r.register(
            "lb_backend_active_sessions",
            "Current sessions of a server: TCP flows, and HTTP server connections (kept-alive ones included)",
            m.server_active.clone(),
        );
        r.register(
            "lb_backend_retries",
            "Connect attempts redispatched to another server after a failure (retries:)",
            m.retries.clone(),
        );
        r.register(
            "lb_backend_unserved",
            "Sessions the backend gave no server: no server available, or every connect attempt failed",
            m.unserved.clone(),
        );
        r.register(
            "lb_server_forwarded_bytes",
            "Payload bytes of a server's flows, both directions, by path: user (copied by lb, counted as they go; an HTTP exchange's heads and bodies when it ends) and kernel (redirected by the kernel, read from live flows at each scrape)",
            m.server_bytes.clone(),
        );
        r.register(
            "lb_server_state",
            "1 for the state a server is in (UP, DOWN, DRAIN, MAINT), 0 for the others",
            m.server_state.clone(),
        );
        r.register(
            "lb_backend_queue",
            "Sessions waiting for a server below its maxconn",
            m.queued.clone(),
        );
        r.register(
            "lb_server_up",
            "1 while a server is healthy (its health checks pass and it was not ejected), else 0",
            m.server_up.clone(),
        );
        r.register(
            "lb_health_check_failures",
            "Failed health checks of a server",
            m.check_failures.clone(),
        );
        r.register(
            "lb_resets",
            "Flows ended by a reset, passed on to the other side, by the side that reset",
            m.resets.clone(),
        );
        r.register(
            "lb_idle_timeouts",
            "Flows closed by timeouts.client or timeouts.server, by side",
            m.timeouts.clone(),
        );
        r.register(
            "lb_kernel_forwarding",
            "1 when established flows are forwarded by the kernel (sockmap), 0 in userspace",
            m.kernel_forwarding.clone(),
        );
        r.register(
            "lb_kernel_fallbacks",
            "Flows the kernel would not take, forwarded in userspace, by reason (ended: a side had ended its stream or reset, before or during the hand-off; no_slot, map_full: the BPF maps were full; no_memory: the kernel had no memory for a SOCKHASH entry; insert_failed: another SOCKHASH insert error, in the debug log; moving: an upgrade was moving the kernel flows)",
            m.kernel_fallbacks.clone(),
        );
        r.register(
            "lb_kernel_duplicated_bytes",
            "Bytes the verdict program took from a socket beyond what TCP received on it (a segment handed to it twice: the peer got them twice), checked when a kernel flow ends; expected to stay 0",
            m.kernel_duplicated_bytes.clone(),
        );
        r.register(
            "lb_dropped_bytes",
            "Bytes lb accepted from one side of a flow and could not deliver because the other side failed, by listener",
            m.dropped_bytes.clone(),
        );
        r.register(
            "lb_tls_handshakes",
            "Client TLS handshakes completed, by listener",
            m.tls_handshakes.clone(),
        );
        r.register(
            "lb_tls_handshake_failures",
            "Client TLS handshakes that failed, by listener and reason (not_tls: plain HTTP or garbage; unknown_sni: strict_sni and no certificate for the name; incompatible: no shared version, suite or ALPN; client_alert: the client refused, e.g. lb's certificate; timeout: timeouts.tls_handshake; closed: the client left; protocol: any other violation)",
            m.tls_failures.clone(),
        );
        r.register(
            "lb_proxy_header_refused",
            "Connections of accept_proxy listeners closed before a server was chosen, by listener and reason (untrusted: from a source accept_proxy does not list; missing: no PROXY signature; malformed; too_long: past the specification's sizes; timeout: not whole within timeouts.client; closed: the client left first)",
            m.proxy_refused.clone(),
        );
        r.register(
            "lb_server_tls_failures",
            "TLS handshakes with a server that failed (its certificate refused, no shared version, timeout)",
            m.server_tls_failures.clone(),
        );
        r.register(
            "lb_ktls_available",
            "1 when the kernel offers kTLS (client TLS sessions are handed to it after their handshake); 0: rustls encrypts and decrypts every TLS session",
            m.ktls_available.clone(),
        );
        r.register(
            "lb_ktls_handoffs",
            "Client TLS sessions offered to the kernel's TLS after their handshake, by listener and result (kernel: the kernel encrypts and decrypts it; kept: rustls goes on, for a cipher the kernel lacks, part of a record already read, or a client that closed right after its handshake; failed: the kernel refused the keys and the session was closed)",
            m.ktls_handoffs.clone(),
        );
        r.register(
            "lb_reloads",
            "Configuration reloads (SIGHUP, lb reload), by result (ok; refused: the file had errors, and nothing changed)",
            m.reloads.clone(),
        );
        let k = &m.kernel;
        r.register(
            "lb_flow_brakes",
            "Times a kernel-forwarded direction was braked: its reader lagged by more than flow_control.max_in_flight",
            k.brakes.clone(),
        );
        r.register(
            "lb_flow_handoffs",
            "Hand-offs of a flow direction between the kernel and the daemon, by direction",
            k.handoffs.clone(),
        );
        r.register(
            "lb_flow_held_bytes",
            "Bytes held back from kernel forwarding (braked) and forwarded by the daemon",
            k.held_bytes.clone(),
        );
        r.register(
            "lb_flows_braked",
            "Kernel flows with a braked direction now",
            k.braked_flows.clone(),
        );
        r.register(
            "lb_flow_most_in_flight_bytes",
            "The most bytes one kernel flow direction had inside lb at once since start (unacknowledged by its receiver plus held on its sender's socket), as seen at brakes and throttles; a direction that never braked or was throttled stayed under half of max_in_flight",
            k.most_in_flight.clone(),
        );
        r.register(
            "lb_kernel_events_lost",
            "Program events the ring buffer had no room for (every flow is then woken)",
            k.events_lost.clone(),
        );
        r.register(
            "lb_kernel_trimmed_bytes",
            "Bytes at the head of retransmitted segments that TCP queued again though the program had already forwarded them, trimmed off",
            k.trimmed_bytes.clone(),
        );
        r.register(
            "lb_kernel_untrimmed_segments",
            "Segments whose repeated head the program could not trim (their repeated bytes went on; should stay 0)",
            k.untrimmed.clone(),
        );
        r.register(
            "lb_kernel_flows",
            "Flows whose sockets are in the SOCKHASH now",
            k.flows.clone(),
        );
        r.register(
            "lb_kernel_tracked_sockets",
            "Sockets with a control slot in the BPF maps now (two per kernel flow)",
            k.tracked_sockets.clone(),
        );
        r.register(
            "lb_kernel_redirected_skbs",
            "skbs the verdict program redirected socket to socket",
            k.redirected_skbs.clone(),
        );
        r.register(
            "lb_kernel_misses",
            "skbs the verdict program found no peer for (held for the daemon)",
            k.misses.clone(),
        );
        r.register(
            "lb_kernel_passed_bytes",
            "Bytes the verdict program passed to the daemon (held) instead of redirecting",
            k.passed_bytes.clone(),
        );
        r.register(
            "lb_kernel_empty_skbs_dropped",
            "Zero-length skbs (bare FINs) dropped by the verdict program",
            k.empty_drops.clone(),
        );
        r.register(
            "lb_kernel_untracked_skbs",
            "skbs of a socket in the map that lb no longer tracks (passed to it)",
            k.untracked.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// The text exposition, with the kernel's counters folded in first.
    pub fn render(&self, kernel: Option<&Kernel>) -> String {
        let _guard = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let kernel_bytes = self
            .forwarded_bytes
            .get_or_create(&PathLabels { path: "kernel" })
            .clone();
        if let Some(k) = kernel {
            k.catch_up_live();
            let s = k.stats();
            catch_up(&kernel_bytes, s.redirected_bytes);
            let km = &self.kernel;
            catch_up(&km.redirected_skbs, s.redirected_skbs);
            catch_up(&km.misses, s.misses);
            catch_up(&km.passed_bytes, s.passed_bytes);
            catch_up(&km.empty_drops, s.empty_drops);
            catch_up(&km.untracked, s.untracked);
            catch_up(&km.brakes, s.brakes);
            catch_up(&km.held_bytes, s.held_bytes);
            catch_up(&km.events_lost, s.events_lost);
            catch_up(&km.trimmed_bytes, s.trimmed_bytes);
            catch_up(&km.untrimmed, s.untrimmed);
            // Every brake hands a direction to the daemon; every (re)start of redirection hands
            // it back (the first one of a flow included).
            let to_user = km
                .handoffs
                .get_or_create(&HandoffLabels {
                    direction: "kernel_to_user",
                })
                .clone();
            catch_up(&to_user, s.brakes);
            let to_kernel = km
                .handoffs
                .get_or_create(&HandoffLabels {
                    direction: "user_to_kernel",
                })
                .clone();
            catch_up(&to_kernel, s.resumes);
            km.flows.set(k.flows());
            km.braked_flows.set(k.braked_flows());
            km.most_in_flight
                .set(i64::try_from(k.most_in_flight()).unwrap_or(i64::MAX));
            km.tracked_sockets.set(k.tracked_sockets());
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Raises a counter to a total read from the kernel.
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_label_values_are_escaped_as_the_text_format_requires() {
        let m = Metrics::new();
        m.connections
            .get_or_create(&ListenerLabels {
                listener: "web\"prod\\1\nx".into(),
            })
            .inc();
        m.server_up
            .get_or_create(&ServerLabels {
                backend: "app".into(),
                server: "s\"1".into(),
            })
            .set(1);
        let text = m.render(None);
        assert!(
            text.contains("lb_connections_total{listener=\"web\\\"prod\\\\1\\nx\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lb_server_up{backend=\"app\",server=\"s\\\"1\"} 1\n"),
            "{text}"
        );
        // Every sample stays on one line.
        assert!(
            text.lines().all(|l| l.starts_with('#') || l.starts_with("lb_")),
            "{text}"
        );
    }
}
