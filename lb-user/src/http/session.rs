//! The HTTP session (`mode: http` listeners): the per-connection supervisor that takes each
//! request through the analyzers before any byte of it reaches a server.
//!
//! A request is held (HOLD) until the request analyzer accepts its head, under
//! `timeouts.http_request` and `limits.max_header_bytes`; then it is routed, rewritten and sent
//! to a server of the chosen backend (the kept-alive server connection when it serves that
//! backend), its body follows as its framing delimits it, and the response head goes through
//! the response analyzer and is rewritten before the client sees it. Then the connection waits
//! for the next request (keep-alive, pipelined requests in order), or, after an upgrade (101)
//! or a CONNECT (2xx), the pair becomes a tunnel the caller hands to the kernel; the rest of a
//! response body after which lb closes goes to the kernel too, once `forwarding.offload_after`
//! of it went in userspace ([`super::handoff`]). Drawn in ../LIFECYCLE.md.
use prometheus_client::metrics::counter::Counter;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    framing::Body,
    handoff::{Handed, Handoff, Kind},
    log, reply,
    request::{self, Request},
    rewrite,
    transfer::{
        self, close_gently, forward_message, write_all, BodyError, Bounds, Conn, Moved, Progress, ReadError,
    },
    upstream::{replayable, send_request, still_open, Sent, ServerConn, CHECK_IDLE_AFTER},
    Rejection,
};
use crate::{
    config::{Http, Listener},
    metrics::status_class,
    proxy_header::Origin,
    runtime::ListenerRt,
    stream::Stream,
};

/// How long lb keeps reading (and dropping) what a client still sends after lb answered it and
/// closed its side: enough for the client to read the answer before the close resets.
const LINGER: Duration = Duration::from_secs(1);

/// How an HTTP session ended.
pub enum HttpEnd {
    /// The client connection is closed; why, for the session log.
    Closed(&'static str),
    /// The pair goes to the forwarding stage: a tunnel, or the rest of a response body.
    /// (Boxed: it is large, and rare.)
    Handoff(Box<Handoff>),
}

/// Where the client connection is.
enum State {
    /// Waiting for a request head; `first`: the connection's first request.
    Waiting {
        client: Conn,
        server: Option<ServerConn>,
        first: bool,
    },
    /// A head accepted by the request analyzer: to be routed, sent and answered.
    Requested {
        client: Conn,
        server: Option<ServerConn>,
        req: Request,
        since: Instant,
    },
    Ended(HttpEnd),
}

/// What a session needs at every step.
pub(super) struct Ctx<'a> {
    pub(super) rt: &'a ListenerRt,
    pub(super) l: &'a Listener,
    pub(super) http: &'a Http,
    pub(super) peer: SocketAddr,
    /// The name the client asked for in its TLS handshake (SNI), for routes.
    sni: Option<String>,
    /// The client's address as the forwarding fields write it (formatted once per connection).
    client_ip: String,
    /// What a PROXY header lb sends to a server says besides `peer`.
    pub(super) origin: &'a Origin,
    /// `lb_http_responses_total` of this listener, by status class.
    responses: &'a [Counter; 5],
    /// Cancelled when lb starts to stop. The connection's own child of
    /// [`crate::runtime::Shared::stopping`]: waiting on it registers with this connection's token, not with one
    /// every connection of every thread registers with at every request.
    stopping: CancellationToken,
    /// Cancelled when a reload removes the listener (this connection's child, likewise).
    removed: CancellationToken,
}

impl Ctx<'_> {
    /// Resolves when kept-alive connections must close: lb stops, or a reload removed the
    /// listener; why.
    async fn closing(&self) -> &'static str {
        tokio::select! {
            () = self.stopping.cancelled() => "lb stopping",
            () = self.removed.cancelled() => "listener removed",
        }
    }
}

/// Runs an HTTP client connection (plain, or after its TLS handshake: `sni`) until it ends or
/// becomes a tunnel.
///
/// A request that arrives after a reload is routed by its listener's new generation (its
/// routes, rules and backends; the kept server connection is let go, since it belongs to the
/// old generation's backend); on a listener a reload removed, the connection closes as it
/// would when lb stops (an idle one at once, a busy one after its response).
pub async fn run(
    rt: Arc<ListenerRt>,
    stream: Stream,
    peer: SocketAddr,
    sni: Option<String>,
    mut origin: Origin,
) -> HttpEnd {
    let mut rt = rt;
    let mut state = State::Waiting {
        client: Conn::new(stream),
        server: None,
        first: true,
    };
    loop {
        let l = &rt.config;
        let (Some(http), Some(responses)) = (&l.http, &rt.http_responses) else {
            return HttpEnd::Closed("not an http listener");
        };
        let ctx = Ctx {
            rt: &rt,
            l,
            http,
            peer,
            sni: sni.clone(),
            client_ip: peer.ip().to_string(),
            origin: &origin,
            responses,
            stopping: rt.shared.stopping.child_token(),
            removed: rt.removed_token().child_token(),
        };
        let next = loop {
            state = match state {
                State::Waiting {
                    client,
                    server,
                    first,
                } => wait_request(&ctx, client, server, first).await,
                // A reload since the last request: this one is routed by the new generation.
                State::Requested {
                    client,
                    server,
                    req,
                    since,
                } => match rt.newer() {
                    Some(next) => {
                        drop(server);
                        state = State::Requested {
                            client,
                            server: None,
                            req,
                            since,
                        };
                        break next;
                    }
                    None => Box::pin(exchange(&ctx, client, server, req, since)).await,
                },
                State::Ended(end) => return end,
            };
        };
        drop(ctx);
        // (An http listener stays one: a reload that makes it tcp ends the connection above.)
        rt = next;
        // The new generation's servers may send PROXY headers, which name the address the
        // client reached.
        if rt.sends_proxy && origin.dst.is_none() {
            if let State::Requested { client, .. } = &state {
                origin.dst = client.stream.tcp().local_addr().ok();
            }
        }
    }
}

/// Holds the client's bytes until the request analyzer accepts a head (or refuses it).
async fn wait_request(ctx: &Ctx<'_>, mut client: Conn, mut server: Option<ServerConn>, first: bool) -> State {
    let limits = &ctx.rt.settings.limits;
    client.shrink_if_idle();
    if let Some(s) = server.as_mut() {
        s.conn.shrink_if_idle();
    }
    let since = Instant::now();
    // Until the first byte: the keep-alive wait (the request timeout for a first request);
    // from the first byte, the whole head within the request timeout.
    let mut deadline = since
        + if first {
            ctx.http.request_timeout
        } else {
            ctx.http.keep_alive_timeout
        };
    let mut started = !client.held.is_empty();
    let mut answering_stop = false;
    if started {
        deadline = since + ctx.http.request_timeout;
    }
    loop {
        if !client.held.is_empty() {
            match request::analyze(&client.held, limits) {
                Ok(Some(req)) => {
                    return State::Requested {
                        client,
                        server,
                        req,
                        since,
                    }
                }
                Ok(None) => {}
                Err(r) => return refuse(ctx, client, None, r).await,
            }
        }
        // Between requests on a kept-alive connection, lb stopping (or a reload removing the
        // listener) closes it (a new connection's first request is still answered, with
        // `Connection: close`). A request whose first bytes already arrived is answered too:
        // closing with them unread would reset the connection.
        let idle = !first && client.held.is_empty() && !answering_stop;
        let read = tokio::select! {
            r = client.fill(deadline) => r,
            why = ctx.closing(), if idle => {
                // After an upgrade an idle connection waits for its next request instead, and
                // answers it with `Connection: close` (see `Shared::upgraded`).
                let upgraded = ctx.rt.shared.upgraded.load(std::sync::atomic::Ordering::Relaxed);
                if !client.has_input() && !upgraded {
                    return State::Ended(HttpEnd::Closed(why));
                }
                answering_stop = true;
                continue;
            }
        };
        match read {
            Ok(0) if client.held.is_empty() => return State::Ended(HttpEnd::Closed("client closed")),
            Ok(0) => {
                return refuse(
                    ctx,
                    client,
                    None,
                    Rejection::new(400, "client closed within the request head"),
                )
                .await
            }
            // A later request's head is timed from its first byte (the first request's from
            // the connection's start: its deadline stays).
            Ok(_) if !started => {
                started = true;
                if !first {
                    deadline = Instant::now() + ctx.http.request_timeout;
                }
            }
            Ok(_) => {}
            // A kept-alive connection nobody uses any more is closed quietly, as HAProxy does.
            Err(ReadError::Timeout) if client.held.is_empty() && !first => {
                return State::Ended(HttpEnd::Closed("keep-alive timeout"))
            }
            Err(ReadError::Timeout) => {
                let r = Rejection::new(408, "request head not complete within timeouts.http_request");
                return refuse(ctx, client, None, r).await;
            }
            // Between requests, a TLS client may close without a close_notify: nothing was cut.
            Err(ReadError::Io(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof && client.held.is_empty() =>
            {
                return State::Ended(HttpEnd::Closed("client closed"))
            }
            Err(ReadError::Io(_)) => return State::Ended(HttpEnd::Closed("client failed")),
        }
    }
}

/// What one exchange measured, for the access log.
pub(super) struct Exchange<'r> {
    pub(super) req: &'r Request,
    /// When lb began to wait for this request.
    since: Instant,
    /// When the request analyzer accepted its head.
    head_at: Instant,
    pub(super) backend: usize,
    pub(super) server_idx: Option<usize>,
    pub(super) connected: Option<Instant>,
    pub(super) responded: Option<Instant>,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
}

impl Exchange<'_> {
    /// Milliseconds waiting for the request head, connecting, and from the request sent to the
    /// response head (-1: not reached), as the access log shows them.
    fn times(&self) -> [i64; 3] {
        let ms = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
            (Some(f), Some(t)) => t.saturating_duration_since(f).as_millis() as i64,
            _ => -1,
        };
        [
            ms(Some(self.since), Some(self.head_at)),
            ms(Some(self.head_at), self.connected),
            ms(self.connected, self.responded),
        ]
    }
}

/// Routes, sends and answers one request; then waits for the next, or ends.
async fn exchange(
    ctx: &Ctx<'_>,
    mut client: Conn,
    kept: Option<ServerConn>,
    req: Request,
    since: Instant,
) -> State {
    let backend = ctx
        .http
        .routes
        .iter()
        .find(|r| r.matches(req.host.as_deref(), ctx.sni.as_deref(), &req.path))
        .map_or(ctx.l.backend, |r| r.backend);
    let mut x = Exchange {
        req: &req,
        since,
        head_at: Instant::now(),
        backend,
        server_idx: None,
        connected: None,
        responded: None,
        bytes_in: req.head_len as u64,
        bytes_out: 0,
    };
    client.consume(req.head_len);
    let client_idle = ctx.l.client_timeout;
    let server_idle = ctx.rt.backend(backend).config.server_timeout;
    let upgrading = rewrite::is_upgrade(&req);
    let head = rewrite::request_head(&req, ctx.http, &ctx.client_ip, ctx.origin.ssl, upgrading);
    // Checking a kept connection costs a syscall, a quarter more per request on a busy
    // keep-alive connection: it is checked when reusing it unchecked could go wrong. A request
    // that cannot go again (a body, or not safe) must not meet a closed connection; after a
    // bodiless response a faulty server may have sent a body anyway; and a connection that
    // idled may have been closed by the server. Otherwise a failure before any answer is
    // retried on a new connection (send_request).
    // A kept connection to a server that no longer takes new flows (drained, in maintenance,
    // down, weight 0) is let go: the request is dispatched anew.
    let reused = kept.and_then(|mut s| {
        let check = !replayable(&req) || s.after_bodiless || s.idle_since.elapsed() >= CHECK_IDLE_AFTER;
        let usable =
            s.backend == backend && s.lease.server().effective_weight() > 0 && (!check || still_open(&mut s));
        usable.then_some(s)
    });
    let (mut server, resp) = match send_request(ctx, &mut client, reused, &head, &mut x).await {
        Sent::Answered(server, resp) => (server, resp),
        Sent::Refused(r) => return refuse(ctx, client, Some(&x), r).await,
        Sent::Over { why, cut } => {
            if cut {
                transfer::cut(client.stream);
            } else {
                close_gently(client.stream, LINGER).await;
            }
            return State::Ended(HttpEnd::Closed(why));
        }
    };
    if resp.status == 101 && !upgrading {
        let r = Rejection::new(502, "101 answer to a request that did not ask to upgrade");
        drop(server);
        return refuse(ctx, client, Some(&x), r).await;
    }
    let tunnel = (resp.status == 101) || (req.method == "CONNECT" && (200..300).contains(&resp.status));
    let close = !tunnel
        && (!rewrite::client_keeps_alive(&req)
            || resp.body == Body::UntilClose
            || ctx.stopping.is_cancelled()
            || ctx.rt.is_removed());
    let mut head = rewrite::response_head(&resp, ctx.http, close);
    let head_len = head.len() as u64;
    if tunnel {
        count(ctx, resp.status);
        x.bytes_out += head_len;
        // What either side sent behind its head is passed on before the kernel takes over (the
        // server's bytes in the same write as the head).
        head.append(&mut server.conn.held);
        let from_client = std::mem::take(&mut client.held);
        let passed = (
            write_all(&mut client.stream, &head, client_idle).await,
            write_all(&mut server.conn.stream, &from_client, server_idle).await,
        );
        access_log(ctx, &x, resp.status, "tunnel", 0);
        if passed.0.is_err() || passed.1.is_err() {
            return State::Ended(HttpEnd::Closed("a side failed at the tunnel's start"));
        }
        let record = handed(ctx, &x, resp.status);
        return State::Ended(HttpEnd::Handoff(Box::new(Handoff {
            client: client.stream,
            server: server.conn.stream,
            backend: ctx.rt.backend(backend).clone(),
            lease: server.lease,
            kind: Kind::Tunnel,
            record,
        })));
    }
    let idle = (server_idle, client_idle);
    // After a response that closes the connection, the rest of its body may go to the kernel
    // (the client's later bytes never reach the server: see super::handoff). Like a TCP flow,
    // it moves forwarding.offload_after bytes in userspace first, so a short body never pays
    // the kernel path's set-up. Not with a TLS side: the kernel cannot take it (no kTLS), and
    // lb forwarding the rest itself is what it does already.
    let plain = !client.stream.is_tls() && !server.conn.stream.is_tls();
    let hand_off_after =
        (close && plain && ctx.rt.shared.kernel.is_some()).then_some(ctx.rt.settings.offload_after);
    let mut progress = Progress::default();
    let moved = forward_message(
        &mut server.conn.source(),
        &mut client.stream,
        head.into(),
        resp.body,
        idle,
        Bounds {
            max: None,
            hand_off_after,
        },
        &mut progress,
    )
    .await;
    if progress.head {
        count(ctx, resp.status);
        x.bytes_out += head_len + progress.body;
    }
    match moved {
        Ok(Moved::Whole(_)) => {}
        Ok(Moved::HandOff(n)) => return hand_off_body(ctx, client, server, &x, resp.status, resp.body, n),
        // Nothing reached the client yet (a bad first chunk came with the head): it gets a
        // 502, as for a malformed head. (Once a write began, the client may hold part of the
        // head: it is cut, below.)
        Err(e) if !progress.started => {
            drop(server);
            return refuse(ctx, client, Some(&x), Rejection::new(502, body_fault(&e))).await;
        }
        Err(e) => {
            // Once the head is out nothing else can tell the client: the connection is cut
            // (a reset, so that no client takes what it got for the whole response).
            access_log(ctx, &x, resp.status, body_fault(&e), 0);
            transfer::cut(client.stream);
            return State::Ended(HttpEnd::Closed(body_fault(&e)));
        }
    }
    access_log(ctx, &x, resp.status, "", 0);
    // A server with a `maxconn` counts requests under way, not idle kept connections (as
    // HAProxy does): its connection goes, and with it the slot, when the exchange ends.
    let keep_server = rewrite::server_keeps_alive(&resp)
        && resp.body != Body::UntilClose
        && server.conn.held.is_empty()
        && server.lease.server().maxconn().is_none();
    if close {
        // The server connection (and its maxconn slot) goes now, not after the linger.
        drop(server);
        close_gently(client.stream, LINGER).await;
        return State::Ended(HttpEnd::Closed("closed after the response"));
    }
    server.idle_since = Instant::now();
    server.after_bodiless = resp.body == Body::None;
    State::Waiting {
        client,
        server: keep_server.then_some(server),
        first: false,
    }
}

/// Hands the rest of a response body to the forwarding stage, server to client only; `sent`:
/// its bytes lb forwarded already (nothing is held: see [`Moved::HandOff`]).
fn hand_off_body(
    ctx: &Ctx<'_>,
    client: Conn,
    server: ServerConn,
    x: &Exchange<'_>,
    status: u16,
    body: Body,
    sent: u64,
) -> State {
    let left = match body {
        Body::Length(n) => Some(n.saturating_sub(sent)),
        _ => None,
    };
    count_bytes(ctx, x);
    State::Ended(HttpEnd::Handoff(Box::new(Handoff {
        client: client.stream,
        server: server.conn.stream,
        backend: ctx.rt.backend(x.backend).clone(),
        lease: server.lease,
        kind: Kind::ResponseBody { left },
        record: handed(ctx, x, status),
    })))
}

/// The bytes an exchange moved in userspace, in its server's `lb_server_forwarded_bytes_total`.
fn count_bytes(ctx: &Ctx<'_>, x: &Exchange<'_>) {
    if let Some(i) = x.server_idx {
        let counters = &ctx.rt.backend(x.backend).servers[i];
        counters.user_bytes.inc_by(x.bytes_in + x.bytes_out);
    }
}

/// The exchange as the record written when its handed-off flow ends shows it.
fn handed(ctx: &Ctx<'_>, x: &Exchange<'_>, status: u16) -> Handed {
    Handed {
        method: x.req.method.clone(),
        host: x.req.host.clone().unwrap_or_else(|| "-".into()),
        target: x.req.target.clone(),
        status,
        format: ctx.http.access_log,
        since: x.since.into_std(),
        bytes_in: x.bytes_in,
        bytes_out: x.bytes_out,
        times: x.times(),
    }
}

/// Answers the client with the rejection's status and closes the connection.
async fn refuse(ctx: &Ctx<'_>, mut client: Conn, x: Option<&Exchange<'_>>, r: Rejection) -> State {
    tracing::debug!(listener = %ctx.l.name, client = %ctx.peer, "refused: {r}");
    count(ctx, r.status);
    let answer = reply::error(r.status);
    match x {
        Some(x) => access_log(ctx, x, r.status, r.why, answer.len() as u64),
        // Refused before a head was accepted: no method, target or backend to show.
        None => log::emit(
            ctx.http.access_log,
            &log::Record {
                client: ctx.peer,
                listener: &ctx.l.name,
                method: "-",
                host: "-",
                target: "-",
                status: r.status,
                bytes_in: client.held.len() as u64,
                bytes_out: answer.len() as u64,
                kernel_bytes: 0,
                backend: "-",
                server: "-",
                times: [-1, -1, -1, -1],
                note: r.why,
            },
        ),
    }
    if write_all(&mut client.stream, &answer, LINGER).await.is_ok() {
        close_gently(client.stream, LINGER).await;
    }
    State::Ended(HttpEnd::Closed(r.why))
}

pub(super) fn count(ctx: &Ctx<'_>, status: u16) {
    ctx.responses[status_class(status)].inc();
}

pub(super) fn body_fault(e: &BodyError) -> &'static str {
    match e {
        BodyError::Source(_) => "server failed within the response body",
        BodyError::Destination(_) => "client failed within the response body",
        BodyError::Malformed(_) => "malformed chunked response body",
        BodyError::TooLarge => "response body too large",
    }
}

/// The exchange's access-log record (format in [`super::log`] and the README).
pub(super) fn access_log(ctx: &Ctx<'_>, x: &Exchange<'_>, status: u16, note: &str, answered: u64) {
    count_bytes(ctx, x);
    if !log::wanted(ctx.http.access_log) {
        return;
    }
    let backend = &ctx.rt.backend(x.backend).config;
    let [request, connect, response] = x.times();
    log::emit(
        ctx.http.access_log,
        &log::Record {
            client: ctx.peer,
            listener: &ctx.l.name,
            method: &x.req.method,
            host: x.req.host.as_deref().unwrap_or("-"),
            target: &x.req.target,
            status,
            bytes_in: x.bytes_in,
            bytes_out: x.bytes_out + answered,
            kernel_bytes: 0,
            backend: &backend.name,
            server: x.server_idx.map_or("-", |i| backend.servers[i].name.as_str()),
            times: [request, connect, response, x.since.elapsed().as_millis() as i64],
            note,
        },
    );
}
