//! Certificate reloads (HAProxy's reload, for what lb can change live): on SIGHUP or
//! `lb reload` (`POST /reload` on the admin endpoint), every TLS listener's certificate files
//! are read again. All or nothing: when any certificate is bad (missing, unreadable, expired,
//! not matching its key), nothing changes and the old certificates stay in use. New handshakes
//! get the new certificates; sessions already under way keep theirs.
//!
//! The rest of the configuration is read at start only.
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{metrics::ResultLabels, server::Proxy};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Listeners whose certificates were replaced.
    pub listeners: usize,
    pub certificates: usize,
}

/// Why a reload was refused: every bad certificate, as `listener `NAME`: FILE: reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificates not reloaded, the old ones stay in use: {}", .0.join("; "))]
pub struct Refused(pub Vec<String>);

/// Reads every TLS listener's certificates again and installs them, or none.
pub fn reload_certificates(proxy: &Proxy) -> Result<Reloaded, Refused> {
    let mut ready = Vec::new();
    let mut problems = Vec::new();
    for (i, tls) in proxy.tls.iter().enumerate() {
        let Some(tls) = tls else { continue };
        let name = &proxy.config.listeners[i].name;
        match tls.reread() {
            Ok(set) => ready.push((tls, set)),
            Err(errors) => {
                problems.extend(errors.into_iter().map(|(_, e)| format!("listener `{name}`: {e}")))
            }
        }
    }
    let counter = |result| {
        let c = proxy
            .metrics
            .tls_reloads
            .get_or_create(&ResultLabels { result })
            .clone();
        c
    };
    if !problems.is_empty() {
        counter("refused").inc();
        return Err(Refused(problems));
    }
    let reloaded = Reloaded {
        listeners: ready.len(),
        certificates: ready.iter().map(|(_, set)| set.certs.len()).sum(),
    };
    for (tls, set) in ready {
        tls.install(set);
    }
    counter("ok").inc();
    Ok(reloaded)
}

/// Reloads on each SIGHUP until `stop`; each result is logged.
pub fn watch(proxy: &Arc<Proxy>, stop: &CancellationToken) {
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP (certificates will not reload on it): {e}");
            return;
        }
    };
    let (proxy, stop) = (proxy.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            log(&reload_certificates(&proxy), "SIGHUP");
        }
    });
}

/// Says in the log how a reload went.
pub fn log(result: &Result<Reloaded, Refused>, by: &str) {
    match result {
        Ok(r) => tracing::info!(
            "{by}: reloaded {} certificate(s) of {} TLS listener(s)",
            r.certificates,
            r.listeners
        ),
        Err(e) => tracing::error!("{by}: {e}"),
    }
}
