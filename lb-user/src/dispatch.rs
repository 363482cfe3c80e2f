//! The dispatch stage, between a session's analysis and forwarding: pick a server of the
//! backend ([`crate::balance`]) and connect to it ([`crate::connect`]); when the connect fails,
//! retry on another server (`retries:`, with HAProxy's `option redispatch` always on) until one
//! answers, the retries are spent, or no untried server is left. Each attempt tells the
//! server's passive check how it went.
use tokio::net::TcpStream;

use crate::{
    balance::{Lease, PickKey},
    connect::{connect, ConnectError},
    server::Proxy,
};

/// Why no server connection came out of dispatch.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No server takes new flows (down, draining, maintenance, weight 0).
    #[error("no server available")]
    NoServer,
    /// Every attempt failed; the last one's error.
    #[error("{attempts} connect attempt(s) failed, the last: {last}")]
    Failed { attempts: u32, last: ConnectError },
}

/// Who is asking, for the pick and the log.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    pub listener: &'a str,
    pub client: std::net::SocketAddr,
    /// The request's path, for `balance: uri`.
    pub path: Option<&'a str>,
    pub nodelay: bool,
}

/// A connection to a server of `backend`, and the lease that counts it.
pub async fn dispatch(
    proxy: &Proxy,
    backend: usize,
    who: Requester<'_>,
) -> Result<(Lease, TcpStream), DispatchError> {
    let state = &proxy.backends[backend];
    let b = &proxy.config.backends[backend];
    let key = PickKey {
        client: who.client.ip(),
        path: who.path,
    };
    let mut tried: Vec<usize> = Vec::new();
    let mut last = None;
    loop {
        let Some(lease) = state.balancer.pick(key, &tried) else {
            break;
        };
        // A retry goes to another server (redispatch): the same one just refused.
        let idx = lease.index();
        if !tried.is_empty() {
            state.retries.inc();
        }
        match connect(
            &b.servers[idx],
            b.connect_timeout,
            who.nodelay,
            proxy.kernel_rcvbuf(),
        )
        .await
        {
            Ok(stream) => {
                state.servers[idx].connections.inc();
                lease.observe(true, b);
                return Ok((lease, stream));
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
