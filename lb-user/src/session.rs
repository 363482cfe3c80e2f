//! The per-session protocol supervisor (TCP mode). After the accept stage hands it a configured
//! client socket, it picks a server, connects, and hands the pair to the forwarding stage. The
//! session's life is the [`Session`] enum; each stage consumes one state and returns the next
//! (drawn in LIFECYCLE.md beside this file).
use std::{net::SocketAddr, sync::Arc, time::Instant};
use tokio::net::TcpStream;

use crate::{
    accept::Accepted,
    connect::{connect, ConnectError},
    forward::{self, kernel::Forwarded, End, Timeouts},
    metrics::EndLabels,
    server::Proxy,
};

/// Where a session is in its life.
enum Session {
    /// Accepted and configured; no server chosen yet.
    Accepted(Accepted),
    /// Both connections are up; the forwarding stage owns them next.
    Connected {
        client: TcpStream,
        peer: SocketAddr,
        server: TcpStream,
        server_idx: usize,
    },
    /// Over.
    Finished(Outcome),
}

/// How a session ended.
#[derive(Debug)]
pub enum Outcome {
    /// No server has a non-zero weight.
    NoServer,
    /// The chosen server could not be reached; the client was closed.
    ConnectFailed(ConnectError),
    /// A socket call of the kernel forwarding stage failed; the pair was reset.
    ForwardFailed(std::io::Error),
    /// Forwarded until the flow ended.
    Forwarded(End),
}

/// Runs one session to its end.
pub async fn run(proxy: Arc<Proxy>, listener: usize, accepted: Accepted) -> Outcome {
    let started = Instant::now();
    let mut state = Session::Accepted(accepted);
    loop {
        state = match state {
            Session::Accepted(a) => connect_stage(&proxy, listener, a).await,
            Session::Connected {
                client,
                peer,
                server,
                server_idx,
            } => forward_stage(&proxy, listener, client, peer, server, server_idx).await,
            Session::Finished(outcome) => {
                tracing::debug!(listener = %proxy.config.listeners[listener].name, ?outcome, elapsed = ?started.elapsed(), "session ended");
                return outcome;
            }
        };
    }
}

async fn connect_stage(proxy: &Proxy, listener: usize, a: Accepted) -> Session {
    let l = &proxy.config.listeners[listener];
    let backend = &proxy.config.backends[l.backend];
    if let Some(dst) = a.original_dst {
        tracing::debug!(listener = %l.name, client = %a.peer, original_dst = %dst, "transparent connection");
    }
    let state = &proxy.backends[l.backend];
    let Some(server_idx) = state.balancer.pick() else {
        tracing::warn!(listener = %l.name, backend = %backend.name, "no server available");
        return Session::Finished(Outcome::NoServer);
    };
    let server = &backend.servers[server_idx];
    match connect(server, backend.connect_timeout, l.nodelay).await {
        Ok(stream) => {
            state.servers[server_idx].connections.inc();
            Session::Connected {
                client: a.stream,
                peer: a.peer,
                server: stream,
                server_idx,
            }
        }
        Err(e) => {
            state.servers[server_idx].connect_errors.inc();
            tracing::warn!(listener = %l.name, backend = %backend.name, client = %a.peer, "connect failed: {e}");
            Session::Finished(Outcome::ConnectFailed(e))
        }
    }
}

async fn forward_stage(
    proxy: &Proxy,
    listener: usize,
    client: TcpStream,
    peer: SocketAddr,
    server: TcpStream,
    server_idx: usize,
) -> Session {
    let l = &proxy.config.listeners[listener];
    let backend = &proxy.config.backends[l.backend];
    let timeouts = Timeouts {
        client: l.client_timeout,
        server: backend.server_timeout,
    };
    let end = match &proxy.kernel {
        None => forward::user::forward(client, server, timeouts, &proxy.user_bytes).await,
        Some(kernel) => {
            let settings = forward::kernel::Settings {
                sndbuf: proxy.config.kernel_sndbuf,
                rcvbuf: proxy.config.kernel_rcvbuf,
                max_in_flight: proxy.config.max_in_flight,
            };
            let counters = forward::kernel::FlowCounters {
                user_bytes: &proxy.user_bytes,
                dropped: &proxy.dropped[listener],
            };
            match forward::kernel::forward(kernel, client, server, timeouts, settings, &counters).await {
                Ok(Forwarded::Done(end)) => end,
                Ok(Forwarded::NotEligible(client, server)) => {
                    proxy.metrics.kernel_fallbacks.inc();
                    forward::user::forward(client, server, timeouts, &proxy.user_bytes).await
                }
                Err(e) => {
                    // The sockets were closed with a reset when the flow was dropped.
                    tracing::error!(listener = %l.name, client = %peer, "kernel forwarding failed: {e}");
                    return Session::Finished(Outcome::ForwardFailed(e));
                }
            }
        }
    };
    let labels = |side: forward::Side| EndLabels {
        listener: l.name.clone(),
        side: side.name(),
    };
    match end {
        End::Reset(side) => {
            proxy.metrics.resets.get_or_create(&labels(side)).inc();
        }
        End::IdleTimeout(side) => {
            proxy.metrics.timeouts.get_or_create(&labels(side)).inc();
            tracing::info!(listener = %l.name, client = %peer, server = %backend.servers[server_idx].name, "{} idle timeout", side.name());
        }
        End::Closed => {}
    }
    Session::Finished(Outcome::Forwarded(end))
}
