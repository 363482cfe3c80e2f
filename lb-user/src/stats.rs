//! A snapshot of what lb is doing, for operators: listeners, backends and each server's state,
//! check result, sessions, queue, bytes by path and errors. The admin endpoint serves it as
//! JSON (`GET /stats.json`, `lb stats --json`) and as the stats page (`GET /stats`); the same
//! numbers are Prometheus metrics.
use serde::{Deserialize, Serialize};

use crate::{
    balance::State,
    metrics::ServerStateLabels,
    runtime::{BackendRt, Runtime},
    tls::{accept::Terminator, ktls::Ktls},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub version: String,
    /// The process (absent from an older lb's answer).
    #[serde(default)]
    pub process: Option<ProcessStats>,
    /// `kernel` or `user`: how established flows are forwarded.
    pub forwarding: String,
    /// With TLS configured: how flows with a TLS side are forwarded (kTLS or userspace).
    #[serde(default)]
    pub tls_forwarding: Option<String>,
    pub listeners: Vec<ListenerStats>,
    pub backends: Vec<BackendStats>,
}

/// The running process (HAProxy's `show info`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessStats {
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started: String,
    pub uptime_seconds: u64,
    /// The last reload since it started, if any.
    pub last_reload: Option<ReloadStats>,
    /// The upgrade that started it, or the last one it tried that failed.
    #[serde(default)]
    pub last_upgrade: Option<ReloadStats>,
}

/// How a reload (or an upgrade) went.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReloadStats {
    /// When (RFC 3339).
    pub at: String,
    /// What asked for it (`SIGHUP`, `lb reload`; `SIGUSR2`, `lb upgrade`).
    pub by: String,
    /// `ok` or `refused` (`failed` for an upgrade).
    pub result: String,
    /// What it did, or why it was refused.
    pub detail: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerStats {
    pub name: String,
    pub bind: String,
    /// `tcp` or `http`.
    pub mode: String,
    pub backend: String,
    /// Connections open now.
    pub active: i64,
    /// Connections accepted since start.
    pub total: u64,
    /// A listener with `tls:`: its handshakes and the certificates it presents now.
    #[serde(default)]
    pub tls: Option<ListenerTlsStats>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerTlsStats {
    /// Handshakes completed since start.
    pub handshakes: u64,
    /// Handshakes that failed since start, every reason.
    pub failed: u64,
    pub certificates: Vec<CertificateStats>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateStats {
    pub subject: String,
    /// The DNS names it serves.
    pub names: Vec<String>,
    /// When it expires (RFC 3339).
    pub not_after: String,
    pub file: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendStats {
    pub name: String,
    pub balance: String,
    /// Sessions waiting for a server below its maxconn.
    pub queue: i64,
    /// Connect attempts redispatched after a failure.
    pub retries: u64,
    /// Sessions given no server: none available, none reached, queue timeout.
    pub unserved: u64,
    pub servers: Vec<ServerStats>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServerStats {
    pub name: String,
    pub address: String,
    /// `UP`, `DOWN`, `DRAIN` or `MAINT`.
    pub state: String,
    /// The last health check's result (`OK`, or why it failed); `-` without checks yet.
    pub check: String,
    pub weight: u32,
    pub maxconn: Option<u32>,
    /// Sessions now.
    pub active: u32,
    /// Connections established since start.
    pub total: u64,
    pub connect_errors: u64,
    pub check_failures: u64,
    /// Payload bytes forwarded by the kernel (read from live flows at each snapshot) and by lb
    /// itself.
    pub bytes_kernel: u64,
    pub bytes_user: u64,
}

/// Sets `lb_server_state` from each server's state now (before a scrape: the state lives in
/// the servers' atomics, not in a metric).
pub fn export_states(rt: &Runtime) {
    for state in &rt.current().backends {
        let b = &state.config;
        for (s, live) in b.servers.iter().zip(state.balancer.servers()) {
            let now = live.state();
            for st in State::ALL {
                let labels = ServerStateLabels {
                    backend: (&b.name).into(),
                    server: (&s.name).into(),
                    state: st.name(),
                };
                let gauge = rt.shared.metrics.server_state.get_or_create(&labels).clone();
                gauge.set(i64::from(st == now));
            }
        }
    }
}

/// What lb is doing now.
pub fn snapshot(rt: &Runtime) -> Stats {
    // The kernel bytes of flows still running, into their servers' counters first.
    if let Some(kernel) = &rt.shared.kernel {
        kernel.catch_up_live();
    }
    let current = rt.current();
    let listeners = current
        .listeners
        .iter()
        .map(|listener| {
            let l = &listener.config;
            let active = listener.active.get();
            let total = listener.connections.get();
            ListenerStats {
                name: l.name.clone(),
                bind: l.bind.to_string(),
                mode: if l.http.is_some() { "http" } else { "tcp" }.into(),
                backend: listener.default_backend().config.name.clone(),
                active,
                total,
                tls: listener.tls.as_ref().map(listener_tls),
            }
        })
        .collect();
    let backends = current
        .backends
        .iter()
        .map(|state| {
            let b = &state.config;
            let servers = (0..b.servers.len()).map(|i| server(state, i)).collect();
            let u = &state.unserved;
            BackendStats {
                name: b.name.clone(),
                balance: b.balance.name().into(),
                queue: state.queued.get(),
                retries: state.retries.get(),
                unserved: u.no_server.get() + u.connect_failed.get() + u.queue_timeout.get(),
                servers,
            }
        })
        .collect();
    let process = &rt.process;
    Stats {
        version: env!("CARGO_PKG_VERSION").into(),
        process: Some(ProcessStats {
            pid: process.pid,
            started: rfc3339(process.started),
            uptime_seconds: process.uptime().as_secs(),
            last_reload: process.last_reload().map(|r| ReloadStats {
                at: rfc3339(r.at),
                by: r.by.into(),
                result: r.result.into(),
                detail: r.detail,
            }),
            last_upgrade: process.last_upgrade().map(|u| ReloadStats {
                at: rfc3339(u.at),
                by: u.by.into(),
                result: u.result.into(),
                detail: u.detail,
            }),
        }),
        forwarding: if rt.shared.kernel.is_some() {
            "kernel"
        } else {
            "user"
        }
        .into(),
        tls_forwarding: rt.shared.ktls.as_ref().map(|k| match k {
            Ktls::Available(ciphers) => format!(
                "userspace, client sessions encrypted and decrypted by the kernel (kTLS: {})",
                ciphers.names().join(", ")
            ),
            Ktls::Unavailable(why) => format!("userspace: kTLS unavailable ({why})"),
        }),
        listeners,
        backends,
    }
}

/// The process in one line: pid, start, and the last reload (`lb stats`, the stats page).
pub fn process_line(p: &ProcessStats) -> String {
    let up = humantime::format_duration(std::time::Duration::from_secs(p.uptime_seconds));
    let reload = match &p.last_reload {
        Some(r) => format!("last reload {} by {}: {} ({})", r.at, r.by, r.result, r.detail),
        None => "no reload yet".into(),
    };
    let reload = match &p.last_upgrade {
        Some(u) => format!(
            "{reload}, last upgrade {} by {}: {} ({})",
            u.at, u.by, u.result, u.detail
        ),
        None => reload,
    };
    format!("pid {}, started {} (up {up}), {reload}", p.pid, p.started)
}

/// Server `index` of `backend` now.
pub fn server(backend: &BackendRt, index: usize) -> ServerStats {
    let (s, live, counters) = backend.server(index);
    ServerStats {
        name: s.name.clone(),
        address: s.address.to_string(),
        state: live.state().name().into(),
        check: if backend.config.health_check.is_some() {
            live.last_check()
        } else {
            "-".into()
        },
        weight: live.weight(),
        maxconn: live.maxconn(),
        active: live.active(),
        total: counters.connections.get(),
        connect_errors: counters.connect_errors.get(),
        check_failures: counters.check_failures.get(),
        bytes_kernel: counters.kernel_bytes.get(),
        bytes_user: counters.user_bytes.get(),
    }
}

/// A TLS listener's counters and the certificates it presents now.
fn listener_tls(tls: &Terminator) -> ListenerTlsStats {
    let set = tls.current();
    ListenerTlsStats {
        handshakes: tls.handshakes.get(),
        failed: tls.failures.iter().map(|c| c.get()).sum(),
        certificates: set
            .certs
            .iter()
            .map(|c| CertificateStats {
                subject: c.subject.clone(),
                names: c.names.clone(),
                not_after: humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.not_after.max(0) as u64),
                )
                .to_string(),
                file: c.files.cert.display().to_string(),
            })
            .collect(),
    }
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
