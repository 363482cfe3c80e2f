//! A listener's runtime object: its configuration, the backends its flows go to, its TLS
//! termination and counters.
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::sync::Arc;

use super::{BackendRt, Shared};
use crate::{
    config::Listener,
    metrics::{ListenerLabels, ResponseLabels, STATUS_CLASSES},
    tls::accept::Terminator,
};

/// A listener while lb runs.
pub struct ListenerRt {
    pub config: Listener,
    pub shared: Arc<Shared>,
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
    /// `backends`: every backend of the configuration `config` comes from, in its order.
    pub fn new(
        config: Listener,
        shared: Arc<Shared>,
        backends: Vec<Arc<BackendRt>>,
        tls: Option<Terminator>,
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
            shared,
        }
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
