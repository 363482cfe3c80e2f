//! Certificate reloads (HAProxy's reload, for what lb can change live): on SIGHUP or
//! `lb reload` (`POST /reload` on the admin endpoint), every TLS listener's certificate files
//! are read again. All or nothing for each listener: when any of its certificates is bad
//! (missing, unreadable, expired, not matching its key), that listener keeps its old ones (the
//! others take their new ones). New handshakes get the new certificates; sessions already
//! under way keep theirs. Reloads run one at a time.
//!
//! The rest of the configuration is read at start only.
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::ResultLabels,
    runtime::{Reload, Runtime},
};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Listeners whose certificates were replaced.
    pub listeners: usize,
    pub certificates: usize,
}

/// Why a reload was refused for some listeners: every bad certificate, as `listener `NAME`:
/// FILE: reason`, and what was reloaded elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificates refused, the listener keeps its old ones: {}{}", .problems.join("; "), others(.reloaded))]
pub struct Refused {
    pub problems: Vec<String>,
    pub reloaded: Reloaded,
}

fn others(r: &Reloaded) -> String {
    match r.listeners {
        0 => String::new(),
        n => format!(
            " (the {} certificate(s) of {n} other listener(s) were reloaded)",
            r.certificates
        ),
    }
}

/// Reads every TLS listener's certificates again and installs each listener's set that is
/// whole; `by`: what asked (`SIGHUP`, `lb reload`), for `lb stats`.
pub fn reload_certificates(rt: &Runtime, by: &'static str) -> Result<Reloaded, Refused> {
    // A SIGHUP and a `lb reload` at once must not install an older read over a newer one.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Once lb stops, systemd hears nothing more than STOPPING=1 (the admin endpoint and the
    // SIGHUP watcher stay up while flows finish).
    let tell_systemd = !rt.shared.stopping.is_cancelled();
    if tell_systemd {
        crate::systemd::reloading();
    }
    let mut reloaded = Reloaded {
        listeners: 0,
        certificates: 0,
    };
    let mut problems = Vec::new();
    for listener in &rt.listeners {
        let Some(tls) = &listener.tls else { continue };
        let name = &listener.config.name;
        match tls.reread() {
            Ok(set) => {
                reloaded.listeners += 1;
                reloaded.certificates += set.certs.len();
                tls.install(set);
            }
            Err(errors) => {
                problems.extend(errors.into_iter().map(|(_, e)| format!("listener `{name}`: {e}")))
            }
        }
    }
    let result = if problems.is_empty() { "ok" } else { "refused" };
    let counter = rt
        .shared
        .metrics
        .tls_reloads
        .get_or_create(&ResultLabels { result })
        .clone();
    counter.inc();
    let outcome = if problems.is_empty() {
        Ok(reloaded)
    } else {
        Err(Refused { problems, reloaded })
    };
    rt.process.record_reload(Reload {
        at: std::time::SystemTime::now(),
        by,
        result,
        detail: match &outcome {
            Ok(r) => said(r),
            Err(e) => e.to_string(),
        },
    });
    // A refused reload leaves lb serving as before.
    if tell_systemd {
        crate::systemd::ready();
    }
    outcome
}

/// Reloads on each SIGHUP until `stop`; each result is logged.
pub fn watch(rt: &Arc<Runtime>, stop: &CancellationToken) {
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP (certificates will not reload on it): {e}");
            return;
        }
    };
    let (rt, stop) = (rt.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            log(&reload_certificates(&rt, "SIGHUP"), "SIGHUP");
        }
    });
}

/// Says in the log how a reload went.
pub fn log(result: &Result<Reloaded, Refused>, by: &str) {
    match result {
        Ok(r) => tracing::info!("{by}: {}", said(r)),
        Err(e) => tracing::error!("{by}: {e}"),
    }
}

/// What a reload that was not refused did.
fn said(r: &Reloaded) -> String {
    format!(
        "reloaded {} certificate(s) of {} TLS listener(s)",
        r.certificates, r.listeners
    )
}
