//! The per-session protocol supervisor. After the accept stage hands it a configured client
//! socket (and, on a listener with `tls:`, the TLS stage completed its handshake), a TCP-mode
//! session picks a server, connects, and hands the pair to the forwarding
//! stage; an HTTP-mode session runs the HTTP supervisor ([`crate::http::session`]) first, whose
//! hand-offs (tunnels after upgrades and CONNECT, and the rest of a response body after which
//! lb closes) come back here for the forwarding stage. The session's life is
//! the [`Session`] enum; each stage consumes one state and returns the next (drawn in
//! LIFECYCLE.md beside this file).
mod moved;

pub use moved::{resume, MovedFlow, MovedHttp, MovedInfo};
use std::{net::SocketAddr, sync::Arc, time::Instant};
use tokio::net::TcpStream;

use crate::{
    config::AcceptProxy,
    proxy_header::{
        receive::{receive, Refusal, Refused},
        Origin,
    },
    stream::Stream,
    tls::accept::Terminator,
};

use crate::{
    accept::Accepted,
    balance::Lease,
    connect::ConnectError,
    dispatch::{dispatch, DispatchError, Requester},
    forward::{self, kernel::Forwarded, user::UserEnd, Directions, End, Timeouts, Totals, Unsent},
    http::{
        handoff::{self, Handed, Kind},
        session::HttpEnd,
    },
    metrics::FallbackLabels,
    runtime::{BackendRt, ListenerRt},
};

/// Where a session is in its life.
enum Session {
    /// Accepted and configured; its PROXY header to come on a listener with `accept_proxy`.
    Accepted(Accepted),
    /// Its client known (from the connection, or from the PROXY header); its TLS handshake
    /// to come on a listener with `tls:`.
    Introduced(Accepted),
    /// A TCP listener's connection, ready for a server.
    Tcp(Client),
    /// An HTTP listener's connection: the HTTP supervisor has it.
    Http(Client),
    /// Both connections are up: forwarded in userspace, until `forwarding.offload_after` bytes
    /// when the kernel path is there (at once to the kernel when that is 0).
    Connected(Pair),
    /// Handed to the kernel path (the forwarding stage's kernel half).
    InKernel(Pair),
    /// The kernel would not take the pair: userspace to the end.
    UserOnly(Pair),
    /// A side speaks TLS, which lb decrypts or encrypts: userspace to the end (no kTLS).
    Streams(Box<StreamPair>),
    /// Over.
    Finished(Outcome),
}

/// A client connection ready for its protocol: plain, or after its TLS handshake.
struct Client {
    stream: Stream,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    /// The name the client asked for in its TLS handshake (SNI).
    sni: Option<String>,
    /// What a PROXY header lb sends says besides `peer`.
    origin: Origin,
}

impl Client {
    /// A connection on a listener without `tls:`.
    fn plain(a: Accepted) -> Client {
        Client {
            stream: Stream::Tcp(a.stream),
            peer: a.peer,
            original_dst: a.original_dst,
            sni: None,
            origin: a.origin,
        }
    }
}

/// A pair with a TLS side.
struct StreamPair {
    client: Stream,
    server: Stream,
    timeouts: Timeouts,
    directions: Directions,
    info: FlowInfo,
}

/// An established client/server pair.
struct Pair {
    client: TcpStream,
    server: TcpStream,
    /// Idle limits of the pair (`timeouts.tunnel` both ways for an HTTP tunnel).
    timeouts: Timeouts,
    /// Both ways, but for the rest of an HTTP response body (server to client only).
    directions: Directions,
    /// Bytes a stopped copy loop had read and not written, for the next path to write first.
    unsent: Unsent,
    info: FlowInfo,
}

/// Who a pair connects, for the counters and logs when it ends.
struct FlowInfo {
    peer: SocketAddr,
    /// The backend the server belongs to (an HTTP route may pick another than the listener's).
    backend: Arc<BackendRt>,
    /// The server, counted as one of its sessions until the flow ends.
    lease: Lease,
    /// An HTTP hand-off's exchange, logged when the flow ends.
    http: Option<(Kind, Handed)>,
}

impl FlowInfo {
    /// The server's counters.
    fn server(&self) -> &crate::runtime::ServerRt {
        &self.backend.servers[self.lease.index()]
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum Outcome {
    /// No server takes new flows; the client was closed.
    NoServer,
    /// No server could be reached (retries included); the last error. The client was closed.
    ConnectFailed(ConnectError),
    /// Every server stayed at its `maxconn` for `timeouts.queue`; the client was closed.
    QueueTimeout,
    /// A socket call of the kernel forwarding stage failed; the pair was reset.
    ForwardFailed(std::io::Error),
    /// Forwarded until the flow ended.
    Forwarded(End),
    /// An HTTP connection ended (why).
    Http(&'static str),
    /// The client's TLS handshake failed.
    Handshake(crate::tls::accept::Failure),
    /// The TLS handshake with the server failed; the client was closed.
    ServerTls,
    /// The kernel flow moved to another process (an upgrade).
    Moved,
    /// An `accept_proxy` listener's connection without an acceptable PROXY header.
    ProxyRefused(Refusal),
}

/// Runs one session to its end.
pub async fn run(listener: Arc<ListenerRt>, accepted: Accepted) -> Outcome {
    let l = &*listener;
    let started = Instant::now();
    let mut state = Session::Accepted(accepted);
    loop {
        state = match state {
            // Each stage's state is boxed while it runs, so a session holds only the stage it is
            // in (an async fn's state would otherwise be as large as the largest stage's).
            Session::Accepted(a) => match &l.config.accept_proxy {
                Some(trusted) => Box::pin(proxy_stage(l, trusted, a)).await,
                None => introduced(l, a),
            },
            Session::Introduced(a) => match &l.tls {
                Some(tls) => Box::pin(tls_stage(l, tls, a)).await,
                None if l.config.peeks_sni() => Box::pin(sni_stage(l, a)).await,
                // No future to box for a plain listener.
                None => protocol(l, Client::plain(a)),
            },
            Session::Tcp(c) => Box::pin(connect_stage(l, c)).await,
            Session::Http(c) => Box::pin(http_stage(&listener, c)).await,
            Session::Streams(pair) => {
                let pair = *pair;
                let counters = l.shared.byte_counters(pair.info.server());
                let (end, totals) = Box::pin(forward::streams::forward(
                    pair.client,
                    pair.server,
                    pair.timeouts,
                    counters,
                    pair.directions,
                ))
                .await;
                finish(l, pair.info, end, totals)
            }
            Session::Connected(pair) => Box::pin(user_stage(l, pair)).await,
            Session::InKernel(pair) => Box::pin(kernel_stage(l, pair)).await,
            Session::UserOnly(pair) => {
                let timeouts = pair.timeouts;
                // Boxed: the copy loops' state is large and would otherwise size every session,
                // kernel-forwarded ones included.
                let end = Box::pin(forward::user::forward(
                    pair.client,
                    pair.server,
                    timeouts,
                    l.shared.byte_counters(pair.info.server()),
                    None,
                    pair.directions,
                    pair.unsent,
                ))
                .await;
                match end {
                    UserEnd::Ended(end, totals) => finish(l, pair.info, end, totals),
                    // Without offload_after the copy loops only end with the flow.
                    UserEnd::Offload(client, server, unsent)
                    | UserEnd::StayInUser(client, server, unsent) => Session::UserOnly(Pair {
                        client,
                        server,
                        unsent,
                        ..pair
                    }),
                }
            }
            Session::Finished(outcome) => {
                tracing::debug!(listener = %l.config.name, ?outcome, elapsed = ?started.elapsed(), "session ended");
                return outcome;
            }
        };
    }
}

/// The PROXY header stage, on a listener with `accept_proxy`: the connection must come from a
/// trusted address and start with a header, whole within `timeouts.client`; the address it
/// carries is the client's from then on (a v2 LOCAL header's, or a v1 UNKNOWN's, leaves the
/// connection's own). Anything else closes the connection, before any server is chosen.
async fn proxy_stage(listener: &ListenerRt, trusted: &AcceptProxy, mut a: Accepted) -> Session {
    let l = &listener.config;
    let refused = if trusted.trusts(a.peer.ip()) {
        match receive(&a.stream, l.client_timeout).await {
            Ok(header) => {
                let via = a.peer;
                if let Some((client, dst)) = header.addresses {
                    // An IPv4 client is one, whichever family the header wrote it in (a
                    // dual-stack load balancer writes `::ffff:a.b.c.d`).
                    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
                    a.peer = canonical(client);
                    a.origin.dst = Some(canonical(dst));
                }
                a.origin.alpn = header.alpn;
                a.origin.authority = header.authority;
                a.origin.ssl = header.ssl;
                tracing::trace!(listener = %l.name, client = %a.peer, via = %via, "PROXY header");
                return introduced(listener, a);
            }
            Err(refused) => refused,
        }
    } else {
        Refused {
            reason: Refusal::Untrusted,
            detail: "from an address accept_proxy does not list".into(),
        }
    };
    listener.proxy_refused[refused.reason as usize].inc();
    tracing::debug!(listener = %l.name, peer = %a.peer, reason = refused.reason.name(), "PROXY header refused: {}", refused.detail);
    Session::Finished(Outcome::ProxyRefused(refused.reason))
}

/// The client is known: when a server may get a PROXY header, the address the client reached
/// is looked up now (the transparent listener's original destination, else the socket's).
fn introduced(listener: &ListenerRt, mut a: Accepted) -> Session {
    if listener.sends_proxy && a.origin.dst.is_none() {
        a.origin.dst = a.original_dst.or_else(|| a.stream.local_addr().ok());
    }
    Session::Introduced(a)
}

/// The TLS stage, on a listener with `tls:` (the handshake, within `timeouts.tls_handshake`);
/// then the listener's protocol.
async fn tls_stage(l: &ListenerRt, tls: &Terminator, a: Accepted) -> Session {
    let (peer, original_dst, mut origin) = (a.peer, a.original_dst, a.origin);
    match tls.handshake(a.stream).await {
        Ok((secured, info)) => {
            // lb terminated TLS: its handshake tells servers what the client asked for.
            origin.alpn = info.alpn;
            origin.authority = info.sni.clone();
            protocol(
                l,
                Client {
                    stream: secured,
                    peer,
                    original_dst,
                    sni: info.sni,
                    origin,
                },
            )
        }
        Err(failure) => {
            tracing::debug!(listener = %l.config.name, client = %peer, reason = failure.name(), "TLS handshake failed");
            Session::Finished(Outcome::Handshake(failure))
        }
    }
}

/// The SNI stage of a `tcp` listener with `route_by_sni:` and no `tls:`: the ClientHello is
/// peeked at (left in the socket for the server), within `timeouts.tls_handshake`.
async fn sni_stage(listener: &ListenerRt, a: Accepted) -> Session {
    let l = &listener.config;
    match crate::tls::peek::client_hello_sni(&a.stream, l.peek_timeout).await {
        Ok(sni) => Session::Tcp(Client {
            sni,
            ..Client::plain(a)
        }),
        Err(failure) => {
            listener.peek_failures[failure as usize].inc();
            tracing::debug!(listener = %l.name, client = %a.peer, reason = failure.name(), "no ClientHello to route by");
            Session::Finished(Outcome::Handshake(failure))
        }
    }
}

/// The listener's protocol for a client connection ready for it.
fn protocol(l: &ListenerRt, client: Client) -> Session {
    if l.config.http.is_some() {
        Session::Http(client)
    } else {
        Session::Tcp(client)
    }
}

async fn connect_stage(listener: &ListenerRt, a: Client) -> Session {
    let l = &listener.config;
    let chosen = listener.backend(l.backend_for_sni(a.sni.as_deref()));
    let backend = &chosen.config;
    if let Some(dst) = a.original_dst {
        tracing::debug!(listener = %l.name, client = %a.peer, original_dst = %dst, "transparent connection");
    }
    let who = Requester {
        listener: &l.name,
        client: a.peer,
        path: None,
        nodelay: l.nodelay,
        http: false,
        rcvbuf: listener.settings.kernel_rcvbuf,
        origin: &a.origin,
    };
    match dispatch(chosen, who).await {
        Ok((lease, stream)) => {
            let info = FlowInfo {
                peer: a.peer,
                backend: chosen.clone(),
                lease,
                http: None,
            };
            let timeouts = Timeouts {
                client: l.client_timeout,
                server: backend.server_timeout,
            };
            match paired(a.stream, stream, timeouts, Directions::Both, info) {
                Ok(pair) => Session::Connected(pair),
                Err(streams) => Session::Streams(streams),
            }
        }
        Err(DispatchError::NoServer) => {
            tracing::warn!(listener = %l.name, backend = %backend.name, client = %a.peer, "no server available");
            Session::Finished(Outcome::NoServer)
        }
        Err(DispatchError::Failed { last, .. }) => Session::Finished(Outcome::ConnectFailed(last)),
        Err(e @ DispatchError::QueueTimeout(_)) => {
            tracing::warn!(listener = %l.name, backend = %backend.name, client = %a.peer, "{e}");
            Session::Finished(Outcome::QueueTimeout)
        }
        // Said in the log by dispatch.
        Err(DispatchError::Tls { .. }) => Session::Finished(Outcome::ServerTls),
    }
}

/// A pair for the kernel and plain forwarding paths when both sides are plain TCP; else one
/// for [`forward::streams`].
fn paired(
    client: Stream,
    server: Stream,
    timeouts: Timeouts,
    directions: Directions,
    info: FlowInfo,
) -> Result<Pair, Box<StreamPair>> {
    match (client.into_tcp(), server.into_tcp()) {
        (Ok(client), Ok(server)) => Ok(Pair {
            client,
            server,
            timeouts,
            directions,
            unsent: Unsent::default(),
            info,
        }),
        (client, server) => Err(Box::new(StreamPair {
            client: client.map_or_else(|tls| tls, Stream::Tcp),
            server: server.map_or_else(|tls| tls, Stream::Tcp),
            timeouts,
            directions,
            info,
        })),
    }
}

/// The HTTP supervisor; a pair it hands on goes to the kernel at once (a tunnel is a
/// long-lived flow whose bytes lb no longer needs to see; a response body has moved
/// `forwarding.offload_after` bytes in userspace already).
async fn http_stage(listener: &Arc<ListenerRt>, a: Client) -> Session {
    match crate::http::session::run(listener.clone(), a.stream, a.peer, a.sni, a.origin).await {
        HttpEnd::Closed(why) => Session::Finished(Outcome::Http(why)),
        HttpEnd::Handoff(h) => {
            let h = *h;
            let l = &listener.config;
            let backend = h.backend.clone();
            let timeouts = match h.kind {
                Kind::Tunnel => {
                    let tunnel = l.http.as_ref().map_or(l.client_timeout, |h| h.tunnel_timeout);
                    Timeouts {
                        client: tunnel,
                        server: tunnel,
                    }
                }
                Kind::ResponseBody { .. } => Timeouts {
                    client: l.client_timeout,
                    server: backend.config.server_timeout,
                },
            };
            let info = FlowInfo {
                peer: a.peer,
                backend,
                lease: h.lease,
                http: Some((h.kind, h.record)),
            };
            match paired(h.client, h.server, timeouts, h.kind.directions(), info) {
                Ok(pair) => Session::InKernel(pair),
                Err(streams) => Session::Streams(streams),
            }
        }
    }
}

/// The userspace start of every flow: to the end without the kernel path, else until the flow
/// has moved `forwarding.offload_after` bytes one way (then the kernel takes it).
async fn user_stage(l: &ListenerRt, pair: Pair) -> Session {
    let offload_after = l.settings.offload_after;
    if l.shared.kernel.is_none() {
        return Session::UserOnly(pair);
    }
    if offload_after == 0 {
        return Session::InKernel(pair);
    }
    let timeouts = pair.timeouts;
    // Boxed, like in UserOnly: only the kernel stage's state stays in the session for long.
    let end = Box::pin(forward::user::forward(
        pair.client,
        pair.server,
        timeouts,
        l.shared.byte_counters(pair.info.server()),
        Some(offload_after),
        pair.directions,
        pair.unsent,
    ))
    .await;
    match end {
        UserEnd::Ended(end, totals) => finish(l, pair.info, end, totals),
        UserEnd::Offload(client, server, unsent) => Session::InKernel(Pair {
            client,
            server,
            unsent,
            ..pair
        }),
        // A side ended its stream first: the kernel takes only ESTABLISHED sockets.
        UserEnd::StayInUser(client, server, unsent) => Session::UserOnly(Pair {
            client,
            server,
            unsent,
            ..pair
        }),
    }
}

/// The kernel half of the forwarding stage.
async fn kernel_stage(l: &ListenerRt, pair: Pair) -> Session {
    let shared = &*l.shared;
    let Some(kernel) = &shared.kernel else {
        return Session::UserOnly(pair);
    };
    let settings = forward::kernel::Settings {
        sndbuf: l.settings.kernel_sndbuf,
        congestion: shared.kernel_congestion.as_deref(),
        max_in_flight: l.settings.max_in_flight,
    };
    let counters = forward::kernel::FlowCounters {
        user_bytes: shared.byte_counters(pair.info.server()),
        dropped: &l.dropped,
        duplicated: &shared.metrics.kernel_duplicated_bytes,
        kernel_bytes: &pair.info.server().kernel_bytes,
    };
    let flow = forward::kernel::Pair {
        client: pair.client,
        server: pair.server,
        timeouts: pair.timeouts,
        directions: pair.directions,
        unsent: pair.unsent,
    };
    let moving = shared.moving_token();
    match forward::kernel::forward(kernel, flow, settings, &counters, &moving).await {
        Ok(Forwarded::Done(end, totals)) => finish(l, pair.info, end, totals),
        Ok(Forwarded::Moved(m)) => moved::hand_over(l, &pair.info, m),
        Ok(Forwarded::NotEligible(why, client, server, unsent)) => {
            let reason = why.name();
            shared
                .metrics
                .kernel_fallbacks
                .get_or_create(&FallbackLabels { reason })
                .inc();
            Session::UserOnly(Pair {
                client,
                server,
                unsent,
                ..pair
            })
        }
        Err(e) => {
            // The sockets were closed with a reset when the flow was dropped.
            tracing::error!(listener = %l.config.name, client = %pair.info.peer, "kernel forwarding failed: {e}");
            // The exchange's record still (a hand-off's only one, for a response body).
            log_handoff_end(l, &pair.info, None, Totals::default());
            Session::Finished(Outcome::ForwardFailed(e))
        }
    }
}

/// Counts how the flow ended; an HTTP hand-off gets its access-log record. (Its kernel bytes
/// were counted as they went: [`crate::bpf::LiveCount`].)
fn finish(listener: &ListenerRt, info: FlowInfo, end: End, totals: Totals) -> Session {
    let l = &listener.config;
    let server = &info.backend.config.servers[info.lease.index()].name;
    match end {
        End::Reset(side) => {
            listener.resets[side.index()].inc();
        }
        End::IdleTimeout(side) => {
            listener.timeouts[side.index()].inc();
            tracing::info!(listener = %l.name, client = %info.peer, server = %server, "{} idle timeout", side.name());
        }
        End::Closed => {}
    }
    log_handoff_end(listener, &info, Some(end), totals);
    Session::Finished(Outcome::Forwarded(end))
}

/// An HTTP hand-off's access-log record, when its flow ended (`None`: the kernel path failed).
fn log_handoff_end(listener: &ListenerRt, info: &FlowInfo, end: Option<End>, totals: Totals) {
    let Some((kind, handed)) = &info.http else {
        return;
    };
    let backend = &info.backend.config;
    let ended = handoff::Ended {
        client: info.peer,
        listener: &listener.config.name,
        backend: &backend.name,
        server: &backend.servers[info.lease.index()].name,
        end,
        kernel_bytes: totals.kernel,
        to_client: totals.to_client,
        past_limit: totals.past_limit,
    };
    handoff::log_end(*kind, handed, &ended);
}
