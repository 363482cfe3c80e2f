//! A listener's runtime object: its configuration, the backends its flows go to, its TLS
//! termination and counters.
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::sync::{
    atomic::{AtomicBool, Ordering::Relaxed},
    Arc,
};

use super::{BackendRt, Settings, Shared};
use crate::{
    config::{Listener, ListenerTls},
    metrics::{KtlsHandOffLabels, ListenerLabels, Metrics, ResponseLabels, TlsFailureLabels, STATUS_CLASSES},
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
    /// Set when a reload removes the listener; shared by every generation of it (a reload
    /// that changes a listener builds a new `ListenerRt`, and sessions keep the one they
    /// started with), so that no session of a removed listener brings its series back.
    removed: Arc<AtomicBool>,
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
            listener: config.name.clone(),
        };
        let http_responses = config.http.as_ref().map(|_| {
            STATUS_CLASSES.map(|code| {
                let labels = ResponseLabels {
                    listener: config.name.clone(),
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
        ListenerRt {
            config,
            backends,
            tls,
            connections,
            active,
            dropped,
            http_responses,
            settings,
            removed: previous.map_or_else(Default::default, |p| p.removed.clone()),
            shared,
        }
    }

    /// A reload removed this listener.
    pub fn retire(&self) {
        self.removed.store(true, Relaxed);
    }

    /// Whether a reload removed it (its series are gone from the scrape).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Relaxed)
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
        listener: name.to_string(),
    };
    let handshakes = metrics.tls_handshakes.get_or_create(&labels).clone();
    let failures = Failure::ALL.map(|f| {
        let labels = TlsFailureLabels {
            listener: name.to_string(),
            reason: f.name(),
        };
        let counter = metrics.tls_failures.get_or_create(&labels).clone();
        counter
    });
    let handoffs = HandOffResult::ALL.map(|r| {
        let labels = KtlsHandOffLabels {
            listener: name.to_string(),
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
