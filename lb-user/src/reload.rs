//! Reloads (HAProxy's reload, without a new process): on SIGHUP or `lb reload` (`POST /reload`
//! on the admin endpoint) the configuration file is read again, and the difference is applied
//! to the running process, all or nothing. A file with any error (syntax, an unknown key, a
//! missing certificate, an address that cannot be bound) is refused with every problem, and
//! nothing changes.
//!
//! What a reload applies, and what it keeps (drawn in LIFECYCLE.md):
//! - listeners added (bound before the reload answers), removed (their socket closes after the
//!   connections already queued on it are taken; their flows go on under their timeouts), or
//!   changed (routes, rules, timeouts, limits, TLS, access log, socket options, `maxconn`);
//!   a listening socket is kept whenever its address stays, so no connection is refused;
//! - backends and servers added, removed (a removed server takes no new flow; its flows go on)
//!   or changed; a server that stays keeps its health and what an operator set at runtime
//!   unless the file changes that field ([`crate::runtime::BackendRt::succeed`]);
//! - the process-wide settings flows read (`forwarding.offload_after`, `flow_control`,
//!   `tune.kernel_sndbuf`, `limits`, `timeouts.shutdown_grace`, `admin.token`). What a running
//!   process cannot change (`forwarding.mode`, `tune.threads`, `tune.cpu_affinity`,
//!   `tune.kernel_congestion`, `tune.kernel_rcvbuf`, `admin.listen`) keeps its running value and is named in the answer as needing an upgrade.
//!
//! A flow under way, in the kernel or in userspace, keeps the generation it started in
//! ([`crate::runtime::Generation`]); an HTTP connection kept alive across a reload serves its
//! next requests with it too, and its metrics of removed objects are no longer exported.
//!
//! This module plans and commits; the wiring module ([`crate::daemon`]) reads the file, binds
//! new listening sockets and runs the accept loops, one reload at a time.
use serde::{Deserialize, Serialize};
use std::{collections::BTreeSet, sync::Arc};
use tokio::{signal::unix::SignalKind, sync::oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, ConfigErrors},
    metrics::ResultLabels,
    runtime::{Control, Generation, Reload, Requests, Runtime},
};

/// A reload asked for: what asked (for the log and `lb stats`), and where the outcome goes.
pub struct Request {
    pub by: &'static str,
    /// Who asked, for the log (an admin client's address).
    pub from: Option<String>,
    pub answer: oneshot::Sender<Result<Reloaded, Refused>>,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reloaded {
    pub listeners: Changes,
    pub backends: Changes,
    /// Servers, as `BACKEND/SERVER` (those of added and removed backends included).
    pub servers: Changes,
    /// Settings the file changed that a running process cannot (their running value stays).
    pub needs_upgrade: Vec<String>,
    /// How long the reload took, from the request to the new configuration in place (reading
    /// and checking the file, binding, building, installing), in milliseconds.
    #[serde(default)]
    pub milliseconds: f64,
}

/// Names added, removed and changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// Why a reload changed nothing: every problem, each `FILE:LINE:COLUMN: message` for the file's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("reload refused, nothing changed:\n{}", .errors.join("\n"))]
pub struct Refused {
    pub errors: Vec<String>,
}

impl From<ConfigErrors> for Refused {
    fn from(e: ConfigErrors) -> Refused {
        Refused {
            errors: e.0.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Asks for a reload and waits for its outcome.
pub async fn ask(reloads: &Requests, by: &'static str, from: Option<String>) -> Result<Reloaded, Refused> {
    let (answer, outcome) = oneshot::channel();
    let stopped = || Refused {
        errors: vec!["lb is stopping: no more reloads".into()],
    };
    reloads
        .send(Control::Reload(Request { by, from, answer }))
        .await
        .map_err(|_| stopped())?;
    outcome.await.unwrap_or_else(|_| Err(stopped()))
}

/// A reload checked against the running generation, not yet applied.
pub struct Plan {
    /// The file's configuration, with the running value of what cannot change live.
    pub config: Config,
    pub reloaded: Reloaded,
}

/// Compares `config` (the file just read) with the running generation.
pub fn plan(running: &Generation, mut config: Config) -> Plan {
    let old = &running.config;
    let needs_upgrade = pin(old, &mut config);
    let listeners = changes(
        old.listeners.iter().map(|l| (l.name.clone(), format!("{l:?}"))),
        config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), format!("{l:?}"))),
    );
    let backend = |b: &crate::config::Backend| {
        // A backend's own settings; its servers are compared one by one.
        let mut own = b.clone();
        own.servers.clear();
        (b.name.clone(), format!("{own:?}"))
    };
    let servers = |c: &Config| -> Vec<(String, String)> {
        c.backends
            .iter()
            .flat_map(|b| {
                b.servers
                    .iter()
                    .map(move |s| (format!("{}/{}", b.name, s.name), format!("{s:?}")))
            })
            .collect()
    };
    let reloaded = Reloaded {
        listeners,
        backends: changes(
            old.backends.iter().map(backend),
            config.backends.iter().map(backend),
        ),
        servers: changes(servers(old).into_iter(), servers(&config).into_iter()),
        needs_upgrade,
        milliseconds: 0.0,
    };
    Plan { config, reloaded }
}

/// Keeps the running value of each setting a running process cannot change; names those the
/// file changed.
fn pin(old: &Config, new: &mut Config) -> Vec<String> {
    let mut named = Vec::new();
    let mut keep = |what: &str, differs: bool| {
        if differs {
            named.push(what.to_string());
        }
        differs
    };
    if keep("forwarding.mode", old.forwarding != new.forwarding) {
        new.forwarding = old.forwarding;
    }
    if keep("tune.threads", old.threads != new.threads) {
        new.threads = old.threads;
    }
    if keep("tune.cpu_affinity", old.cpu_affinity != new.cpu_affinity) {
        new.cpu_affinity = old.cpu_affinity.clone();
    }
    if keep(
        "tune.kernel_congestion",
        old.kernel_congestion != new.kernel_congestion,
    ) {
        new.kernel_congestion = old.kernel_congestion.clone();
    }
    if keep("tune.kernel_rcvbuf", old.kernel_rcvbuf != new.kernel_rcvbuf) {
        new.kernel_rcvbuf = old.kernel_rcvbuf;
    }
    let listen = |a: &Option<crate::config::Admin>| a.as_ref().map(|a| a.listen);
    if keep("admin.listen", listen(&old.admin) != listen(&new.admin)) {
        new.admin = match (&old.admin, new.admin.take()) {
            (Some(o), Some(n)) => Some(crate::config::Admin {
                listen: o.listen,
                token: n.token,
            }),
            (o, _) => o.clone(),
        };
    }
    named
}

/// What differs between two sets of (name, description).
fn changes(
    old: impl Iterator<Item = (String, String)>,
    new: impl Iterator<Item = (String, String)>,
) -> Changes {
    let old: Vec<(String, String)> = old.collect();
    let new: Vec<(String, String)> = new.collect();
    let old_names: BTreeSet<&String> = old.iter().map(|(n, _)| n).collect();
    let new_names: BTreeSet<&String> = new.iter().map(|(n, _)| n).collect();
    Changes {
        added: new_names.difference(&old_names).map(|n| n.to_string()).collect(),
        removed: old_names.difference(&new_names).map(|n| n.to_string()).collect(),
        changed: new
            .iter()
            .filter(|(n, d)| old.iter().any(|(o, od)| o == n && od != d))
            .map(|(n, _)| n.clone())
            .collect(),
    }
}

/// Applies `plan`: the new generation becomes the running one (new sessions use it), what it
/// removed is retired (no new flows, series gone from the scrape), and health checks restart
/// on the new backends' servers (ending with `stop`). The caller bound the new listeners'
/// sockets already; it moves the accept loops over after this.
pub fn commit(rt: &Runtime, plan: Plan, stop: &CancellationToken) -> Arc<Generation> {
    let running = rt.current();
    let next = Generation::build(plan.config, &rt.shared, Some(&running));
    let metrics = &rt.shared.metrics;
    for l in &running.listeners {
        match next.listener(&l.config.name) {
            Some(successor) => l.succeeded_by(successor.clone()),
            None => {
                l.retire();
                metrics.forget_listener(&l.config.name);
            }
        }
    }
    for b in &running.backends {
        // Every backend of the running generation is replaced or removed.
        b.checks.cancel();
        let kept = next.backend(&b.config.name);
        if kept.is_none() {
            b.retire();
            metrics.forget_backend(&b.config.name);
        }
        for s in &b.config.servers {
            if !kept.is_some_and(|k| k.config.servers.iter().any(|n| n.name == s.name)) {
                metrics.forget_server(&b.config.name, &s.name);
            }
        }
    }
    crate::health::spawn(&next.backends, stop);
    rt.install(next);
    rt.current()
}

/// Records how a reload went (`lb stats`, `lb_reloads_total`) and says it in the log.
pub fn record(rt: &Runtime, by: &'static str, from: Option<&str>, outcome: &Result<Reloaded, Refused>) {
    let result = if outcome.is_ok() { "ok" } else { "refused" };
    let counter = rt
        .shared
        .metrics
        .reloads
        .get_or_create(&ResultLabels { result })
        .clone();
    counter.inc();
    let who = match from {
        Some(from) => format!("{by} from {from}"),
        None => by.to_string(),
    };
    // The log has every problem; `lb stats` one line.
    let detail = match outcome {
        Ok(r) => {
            let line = said(r);
            tracing::info!("{who}: {line}");
            line
        }
        Err(e) => {
            tracing::error!("{who}: {e}");
            let first = e.errors.first().map(String::as_str).unwrap_or_default();
            match e.errors.len() {
                1 => format!("reload refused, nothing changed: {first}"),
                n => format!("reload refused, nothing changed: {n} problems, the first: {first}"),
            }
        }
    };
    rt.process.record_reload(Reload {
        at: std::time::SystemTime::now(),
        by,
        result,
        detail,
    });
}

/// Asks for a reload on each SIGHUP until `stop`.
pub fn watch(reloads: Requests, stop: &CancellationToken) {
    crate::shutdown::on_each(
        SignalKind::hangup(),
        "SIGHUP",
        "the configuration will not reload on it",
        stop,
        move || {
            let reloads = reloads.clone();
            // The outcome is logged and recorded where the reload is applied.
            async move {
                let _ = ask(&reloads, "SIGHUP", None).await;
            }
        },
    );
}

/// What a reload that was not refused did, in a line.
pub fn said(r: &Reloaded) -> String {
    let part = |what: &str, c: &Changes| {
        format!(
            "{what} +{} -{} ~{}",
            c.added.len(),
            c.removed.len(),
            c.changed.len()
        )
    };
    let mut line = format!(
        "reloaded: {}, {}, {}",
        part("listeners", &r.listeners),
        part("backends", &r.backends),
        part("servers", &r.servers)
    );
    if !r.needs_upgrade.is_empty() {
        line += &format!(
            "; needs an upgrade (running value kept): {}",
            r.needs_upgrade.join(", ")
        );
    }
    line + &format!(" (in {:.1} ms)", r.milliseconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_what_was_added_removed_and_changed() {
        let set = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(n, d)| (n.to_string(), d.to_string()))
                .collect::<Vec<_>>()
                .into_iter()
        };
        let c = changes(
            set(&[("a", "1"), ("b", "1"), ("c", "1")]),
            set(&[("b", "1"), ("c", "2"), ("d", "1")]),
        );
        assert_eq!(c.added, ["d"]);
        assert_eq!(c.removed, ["a"]);
        assert_eq!(c.changed, ["c"]);
    }
}
