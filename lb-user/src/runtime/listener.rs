//! A listener's runtime object: its configuration, the backends its flows go to, its TLS
//! termination and counters.
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::sync::{Arc, OnceLock};
use tokio_util::sync::CancellationToken;

use super::{BackendRt, Settings, Shared};
use crate::{
    config::{Listener, ListenerTls},
    forward::Side,
    metrics::{
        EndLabels, KtlsHandOffLabels, ListenerLabels, Metrics, ResponseLabels, TlsFailureLabels,
        STATUS_CLASSES,
    },
    proxy_header::receive::Refusal,
    tls::{
        accept::{Failure, HandOffResult, Terminator},
        ktls::Ktls,
    },
};

/// A listener while lb runs.
pub struct ListenerRt {
    pub config: Listener,
    pub shared: Arc<Shared>,
    /// The process-wide settings of the configuration this listener was built from.
    pub settings: Arc<Settings>,
    /// Cancelled when a reload removes the listener; shared by every generation of it (a
    /// reload that changes a listener builds a new `ListenerRt`, and sessions keep the one
    /// they started with), so that no session of a removed listener brings its series back,
    /// and its kept-alive HTTP connections close.
    removed: CancellationToken,
    /// The listener of the same name a later reload built: an HTTP connection kept alive
    /// across the reload moves to it between requests.
    successor: OnceLock<Arc<ListenerRt>>,
    /// The backends of the configuration this listener was built from, in its order: the
    /// listener's `backend` and routes name them by index.
    backends: Vec<Arc<BackendRt>>,
    /// Its TLS termination, with `tls:`.
    pub tls: Option<Terminator>,
    /// `lb_connections_total` and `lb_active_connections` of this listener.
    pub connections: Counter,
    pub active: Gauge,
    /// `lb_dropped_bytes_total{listener}`.
    pub dropped: Counter,
    /// `lb_resets_total{listener,side}` and `lb_idle_timeouts_total{listener,side}`, by
    /// [`crate::forward::Side::index`].
    pub resets: [Counter; 2],
    pub timeouts: [Counter; 2],
    /// `lb_tls_handshake_failures_total{listener,reason}` by [`Failure`] (the SNI peek's; a
    /// TLS listener's terminator has its own).
    pub peek_failures: [Counter; Failure::ALL.len()],
    /// `lb_proxy_header_refused_total{listener,reason}` by [`Refusal`] (with `accept_proxy`).
    pub proxy_refused: [Counter; Refusal::ALL.len()],
    /// Whether a server of the configuration's backends sends a PROXY header: sessions then
    /// learn the address their client reached.
    pub sends_proxy: bool,
    /// With `mode: http`: `lb_http_responses_total{listener,code}` by
    /// [`crate::metrics::status_class`], held to avoid a label lookup per response.
    pub http_responses: Option<[Counter; 5]>,
}

impl ListenerRt {
    /// `backends`: every backend of the configuration `config` comes from, in its order;
    /// `previous`: the listener of the same name this one replaces in a reload.
    pub fn new(
        config: Listener,
        shared: Arc<Shared>,
        settings: Arc<Settings>,
        backends: Vec<Arc<BackendRt>>,
        previous: Option<&ListenerRt>,
    ) -> ListenerRt {
        let metrics = &shared.metrics;
        let labels = ListenerLabels {
            listener: (&config.name).into(),
        };
        let http_responses = config.http.as_ref().map(|_| {
            STATUS_CLASSES.map(|code| {
                let labels = ResponseLabels {
                    listener: (&config.name).into(),
                    code,
                };
                metrics.http_responses.get_or_create(&labels).clone()
            })
        });
        let tls = config
            .tls
            .as_ref()
            .map(|t| terminator(&config.name, t, metrics, shared.ktls.as_ref()));
        let connections = metrics.connections.get_or_create(&labels).clone();
        let active = metrics.active.get_or_create(&labels).clone();
        let dropped = metrics.dropped_bytes.get_or_create(&labels).clone();
        let ends = |family: &prometheus_client::metrics::family::Family<EndLabels, Counter>| {
            Side::BOTH.map(|side| {
                let labels = EndLabels {
                    listener: (&config.name).into(),
                    side: side.name(),
                };
                let counter = family.get_or_create(&labels).clone();
                counter
            })
        };
        let (resets, timeouts) = (ends(&metrics.resets), ends(&metrics.timeouts));
        let peek_failures = if config.peeks_sni() {
            failure_counters(&config.name, metrics)
        } else {
            Default::default()
        };
        let proxy_refused = match config.accept_proxy {
            Some(_) => Refusal::ALL.map(|r| {
                let labels = TlsFailureLabels {
                    listener: (&config.name).into(),
                    reason: r.name(),
                };
                let counter = metrics.proxy_refused.get_or_create(&labels).clone();
                counter
            }),
            None => Default::default(),
        };
        let sends_proxy = backends
            .iter()
            .any(|b| b.config.servers.iter().any(|s| s.send_proxy.is_some()));
        ListenerRt {
            proxy_refused,
            sends_proxy,
            config,
            backends,
            tls,
            connections,
            active,
            dropped,
            resets,
            timeouts,
            peek_failures,
            http_responses,
            settings,
            removed: previous.map_or_else(Default::default, |p| p.removed.clone()),
            successor: OnceLock::new(),
            shared,
        }
    }

    /// A reload removed this listener.
    pub fn retire(&self) {
        self.removed.cancel();
    }

    /// Whether a reload removed it (its series are gone from the scrape).
    pub fn is_removed(&self) -> bool {
        self.removed.is_cancelled()
    }

    /// Cancelled when a reload removes it.
    pub fn removed_token(&self) -> &CancellationToken {
        &self.removed
    }

    /// A reload built `next` in its place.
    pub fn succeeded_by(&self, next: Arc<ListenerRt>) {
        let _ = self.successor.set(next);
    }

    /// The newest generation of this listener, if a reload built one since this one.
    pub fn newer(&self) -> Option<Arc<ListenerRt>> {
        let mut newest = self.successor.get()?.clone();
        // One link per reload since; each reload adds one.
        while let Some(next) = newest.successor.get().cloned() {
            newest = next;
        }
        Some(newest)
    }

    /// Backend `index` of the configuration (the listener's `backend`, a route's).
    pub fn backend(&self, index: usize) -> &Arc<BackendRt> {
        &self.backends[index]
    }

    /// The listener's own backend (`backend:`).
    pub fn default_backend(&self) -> &Arc<BackendRt> {
        self.backend(self.config.backend)
    }
}

/// A listener's TLS termination, with its counters.
fn terminator(name: &str, settings: &ListenerTls, metrics: &Metrics, ktls: Option<&Ktls>) -> Terminator {
    let labels = ListenerLabels {
        listener: name.into(),
    };
    let handshakes = metrics.tls_handshakes.get_or_create(&labels).clone();
    let failures = failure_counters(name, metrics);
    let handoffs = HandOffResult::ALL.map(|r| {
        let labels = KtlsHandOffLabels {
            listener: name.into(),
            result: r.name(),
        };
        let counter = metrics.ktls_handoffs.get_or_create(&labels).clone();
        counter
    });
    let kernel = match ktls {
        Some(Ktls::Available(ciphers)) => Some(*ciphers),
        _ => None,
    };
    Terminator::new(settings, handshakes, failures, kernel, handoffs)
}

/// A listener's `lb_tls_handshake_failures_total` series, by [`Failure`].
fn failure_counters(name: &str, metrics: &Metrics) -> [Counter; Failure::ALL.len()] {
    Failure::ALL.map(|f| {
        let labels = TlsFailureLabels {
            listener: name.into(),
            reason: f.name(),
        };
        let counter = metrics.tls_failures.get_or_create(&labels).clone();
        counter
    })
}
