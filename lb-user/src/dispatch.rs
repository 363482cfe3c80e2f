//! The dispatch stage, between a session's analysis and forwarding: pick a server of the
//! backend ([`crate::balance`]) and connect to it ([`crate::connect`]); when the connect fails,
//! retry on another server (`retries:`, with HAProxy's `option redispatch` always on) until one
//! answers, the retries are spent, or no untried server is left. Each attempt tells the
//! server's passive check how it went. A server with `tls:` then gets its TLS handshake
//! ([`crate::tls::connect`]); a failed one is not retried (a certificate lb refuses is most
//! likely refused on every server of the backend: it is a configuration to fix, said in the log).
use std::time::Duration;
use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    time::{timeout_at, Instant},
};

use crate::{
    balance::{Lease, Pick, PickKey},
    config::Server,
    connect::{connect, ConnectError},
    runtime::BackendRt,
    stream::Stream,
    tls::connect::HandshakeError,
};

/// Why no server connection came out of dispatch.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No server takes new flows (down, draining, maintenance, weight 0).
    #[error("no server available")]
    NoServer,
    /// Every server was at its `maxconn` for the whole `timeouts.queue`.
    #[error("every server stayed at its maxconn for timeouts.queue ({0:?})")]
    QueueTimeout(std::time::Duration),
    /// Every attempt failed; the last one's error.
    #[error("{attempts} connect attempt(s) failed, the last: {last}")]
    Failed { attempts: u32, last: ConnectError },
    /// Connected, but the TLS handshake with the server failed.
    #[error("TLS to server {server} ({address}) failed: {source}")]
    Tls {
        server: String,
        address: std::net::SocketAddr,
        source: HandshakeError,
    },
}

/// Who is asking, for the pick and the log.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    pub listener: &'a str,
    pub client: std::net::SocketAddr,
    /// The request's path, for `balance: uri`.
    pub path: Option<&'a str>,
    pub nodelay: bool,
    /// An HTTP session: a connect that succeeds says nothing of the server's health yet (its
    /// answer does: 5xx or none is a failure, [`Lease::observe`]); a TCP flow's connect is all
    /// lb sees of it.
    pub http: bool,
    /// SO_RCVBUF of the server socket (`tune.kernel_rcvbuf` with the kernel path).
    pub rcvbuf: Option<u32>,
    /// What a PROXY header says besides `client`, for a server with `send_proxy`.
    pub origin: &'a crate::proxy_header::Origin,
}

/// A connection to a server of `backend` (with its TLS session when the server has `tls:`),
/// and the lease that counts it.
pub async fn dispatch(state: &BackendRt, who: Requester<'_>) -> Result<(Lease, Stream), DispatchError> {
    let b = &state.config;
    let key = PickKey {
        client: who.client.ip(),
        path: who.path,
    };
    let mut tried: Vec<usize> = Vec::new();
    let mut last = None;
    let queue_deadline = Instant::now() + b.queue_timeout;
    loop {
        // While sessions wait, a new one waits with them rather than take a slot before them.
        let waiting = state.queued.get() > 0 && tried.is_empty();
        let pick = if waiting {
            Pick::Full
        } else {
            state.balancer.pick(key, &tried)
        };
        let lease = match pick {
            Pick::Server(lease) => lease,
            Pick::NoServer => break,
            Pick::Full => match queued(state, key, &tried, queue_deadline).await {
                Ok(Some(lease)) => lease,
                Ok(None) => break,
                Err(_) => {
                    state.unserved.queue_timeout.inc();
                    return Err(DispatchError::QueueTimeout(b.queue_timeout));
                }
            },
        };
        let idx = lease.index();
        // A retry goes to another server (redispatch): the ones tried are left out.
        if !tried.is_empty() {
            state.retries.inc();
        }
        let started = Instant::now();
        let connected = match connect(&b.servers[idx], b.connect_timeout, who.nodelay, who.rcvbuf).await {
            // The header's write shares the connect's time limit.
            Ok(stream) => introduce(&b.servers[idx], stream, &who, (started, b.connect_timeout)).await,
            Err(e) => Err(e),
        };
        match connected {
            Ok(stream) => {
                state.servers[idx].connections.inc();
                let server = &b.servers[idx];
                let Some(tls) = &server.tls else {
                    if !who.http {
                        lease.observe(true, b);
                    }
                    return Ok((lease, Stream::Tcp(stream)));
                };
                return match crate::tls::connect::handshake(tls, stream, b.connect_timeout).await {
                    Ok(secured) => {
                        if !who.http {
                            lease.observe(true, b);
                        }
                        Ok((lease, Stream::Tls(Box::new(secured.into()))))
                    }
                    Err(source) => {
                        state.servers[idx].tls_failures.inc();
                        lease.observe(false, b);
                        let e = DispatchError::Tls {
                            server: server.name.clone(),
                            address: server.address,
                            source,
                        };
                        tracing::warn!(listener = %who.listener, backend = %b.name, client = %who.client, "{e}");
                        Err(e)
                    }
                };
            }
            Err(e) => {
                state.servers[idx].connect_errors.inc();
                tracing::warn!(listener = %who.listener, backend = %b.name, client = %who.client, "connect failed: {e}");
                lease.observe(false, b);
                tried.push(idx);
                last = Some(e);
                if tried.len() > b.retries as usize {
                    break;
                }
            }
        }
    }
    match last {
        None => {
            state.unserved.no_server.inc();
            Err(DispatchError::NoServer)
        }
        Some(last) => {
            state.unserved.connect_failed.inc();
            Err(DispatchError::Failed {
                attempts: tried.len() as u32,
                last,
            })
        }
    }
}

/// Writes the server's PROXY header (`send_proxy`) on a new connection, before any other byte
/// (before the TLS handshake too, as HAProxy does); a failed write fails the connect.
async fn introduce(
    server: &Server,
    mut stream: TcpStream,
    who: &Requester<'_>,
    (started, limit): (Instant, Duration),
) -> Result<TcpStream, ConnectError> {
    let Some(version) = server.send_proxy else {
        return Ok(stream);
    };
    let io_err = |source| ConnectError::Io {
        server: server.name.clone(),
        address: server.address,
        source,
    };
    // (Building it cannot fail with what lb writes: two TLVs of at most 255 bytes.)
    let header = who.origin.header(version, who.client).map_err(io_err)?;
    // A new connection's send buffer is empty: the write completes at once, without a wait.
    match timeout_at(started + limit, stream.write_all(&header)).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(e)) => Err(io_err(e)),
        Err(_) => Err(ConnectError::Timeout {
            server: server.name.clone(),
            address: server.address,
            timeout: limit,
        }),
    }
}

/// Waits in the backend's queue (`lb_backend_queue`) until a server below its `maxconn` can
/// be picked (`None`: no server takes new flows any more), or `deadline` (`Err`).
async fn queued(
    state: &BackendRt,
    key: PickKey<'_>,
    tried: &[usize],
    deadline: Instant,
) -> Result<Option<Lease>, tokio::time::error::Elapsed> {
    state.queued.inc();
    let picked = timeout_at(deadline, async {
        loop {
            // Registered before the pick, so a slot freed between the two is not missed.
            let freed = state.balancer.queue().notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            match state.balancer.pick(key, tried) {
                Pick::Server(lease) => return Some(lease),
                // Every server went away meanwhile (down, drained): nothing to wait for.
                Pick::NoServer => return None,
                Pick::Full => freed.await,
            }
        }
    })
    .await;
    state.queued.dec();
    picked
}
