//! The server side of an HTTP exchange: a server connection (the kept one, or a new one from
//! the backend's balancer), the request sent on it, and the response head read back through
//! the response analyzer. The client side and the session's states are in [`super::session`].
use std::{io, os::fd::AsFd, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

use super::{
    framing::Body,
    request::Request,
    response::{self, Response},
    rewrite,
    session::{Ctx, Exchange},
    transfer::{write_all, Conn, ReadError, Source},
    Rejection, Version,
};
use crate::{
    balance::Lease,
    dispatch::{dispatch, DispatchError, Requester},
    sockopt,
};

/// A server connection, kept between requests while it serves the same backend.
pub(super) struct ServerConn {
    pub(super) conn: Conn,
    pub(super) backend: usize,
    /// The server, counted as one of its sessions while the connection lasts.
    pub(super) lease: Lease,
    /// When its last response ended (it idles since).
    pub(super) idle_since: Instant,
    /// Its last response had no body (HEAD, 204, 304): where a faulty server may still send
    /// one, which must not be read as the next answer.
    pub(super) after_bodiless: bool,
}

/// A kept server connection idle at least this long is checked before it is reused (a server
/// closes idle connections after its own keep-alive timeout, seconds typically).
pub(super) const CHECK_IDLE_AFTER: Duration = Duration::from_millis(500);

/// How sending a request ended.
pub(super) enum Sent {
    /// The request went whole; the final response head, for the session to forward.
    Answered(ServerConn, Response),
    /// No response reached the client: the session answers with this (the server connection
    /// is let go, reset when it has an incomplete request).
    Refused(Rejection),
    /// An early answer to a request with a body was forwarded already (logged): the client
    /// connection is to be closed, with a reset when `cut` (the answer did not go whole).
    Over { why: &'static str, cut: bool },
}

/// Sends the request and reads the response head, on the kept server connection or a new one.
/// A request with a body goes through [`super::duplex`]: its body is sent while the response
/// is read. A kept connection the server closed meanwhile (it may close an idle connection at
/// any time) is replaced once, for a [`replayable`] request.
pub(super) async fn send_request(
    ctx: &Ctx<'_>,
    client: &mut Conn,
    reused: Option<ServerConn>,
    head: &[u8],
    x: &mut Exchange<'_>,
) -> Sent {
    if x.req.body != Body::None {
        return super::duplex::send_with_body(ctx, client, reused, head, x).await;
    }
    match send_bodiless(ctx, client, reused, head, x).await {
        Ok((server, resp)) => Sent::Answered(server, resp),
        Err(r) => Sent::Refused(r),
    }
}

/// [`send_request`] for a request without a body: the head in one write, then the response
/// head.
async fn send_bodiless(
    ctx: &Ctx<'_>,
    client: &mut Conn,
    reused: Option<ServerConn>,
    head: &[u8],
    x: &mut Exchange<'_>,
) -> Result<(ServerConn, Response), Rejection> {
    // A kept connection the server closed while it idled fails before any answer: a
    // replayable request then goes again on a new connection. A timeout or any other failure
    // is final: the server may have acted on the request.
    let replayable = replayable(x.req);
    let mut reused = reused;
    loop {
        let was_reused = reused.is_some();
        let mut server = match reused.take() {
            Some(s) => s,
            None => connect_server(ctx, x.backend, &x.req.path).await?,
        };
        x.server_idx = Some(server.lease.index());
        x.connected = Some(Instant::now());
        let server_idle = ctx.rt.backend(x.backend).config.server_timeout;
        let answer = match write_all(&mut server.conn.stream, head, server_idle).await {
            Ok(()) => {
                let deadline = Instant::now() + server_idle;
                read_response(ctx, &mut client.stream, &mut server.conn.source(), x, deadline).await
            }
            Err(_) => Err(NoAnswer {
                rejection: Rejection::new(502, "server failed while receiving the request"),
                closed_early: true,
            }),
        };
        let backend = &ctx.rt.backend(x.backend).config;
        match answer {
            Ok(resp) => {
                server.lease.observe(resp.status < 500, backend);
                return Ok((server, resp));
            }
            // Most likely closed by the server while it idled: not a fault of the server.
            Err(no) if was_reused && replayable && no.closed_early => continue,
            Err(no) => {
                // No answer, or a malformed one (502), or none in time (504): the server's
                // fault (a client failing meanwhile is not).
                if no.rejection.status >= 500 {
                    server.lease.observe(false, backend);
                }
                return Err(no.rejection);
            }
        }
    }
}

/// A request that may go again on a new connection when its kept one failed before any
/// answer: safe (RFC 9110 §9.2.1) and without a body.
pub(super) fn replayable(req: &Request) -> bool {
    req.body == Body::None && ["GET", "HEAD", "OPTIONS", "TRACE"].contains(&req.method.as_str())
}

/// The answer when the server sent no response head within `timeouts.server`.
pub(super) const NO_HEAD_IN_TIME: Rejection = Rejection::new(504, "no response head within timeouts.server");

/// Why no response head came.
pub(super) struct NoAnswer {
    pub(super) rejection: Rejection,
    /// The connection failed (closed, reset, refused the request) before the server sent a
    /// byte: on a kept connection, most likely closed while it idled.
    closed_early: bool,
}

impl From<Rejection> for NoAnswer {
    fn from(rejection: Rejection) -> NoAnswer {
        NoAnswer {
            rejection,
            closed_early: false,
        }
    }
}

/// Reads the final response head from `server`, by `deadline` (else 504). Interim ones (1xx
/// but 101) are passed on to `client` first, except to an HTTP/1.0 client, which cannot take
/// them (RFC 9110 §15.2).
pub(super) async fn read_response<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    ctx: &Ctx<'_>,
    client: &mut W,
    server: &mut Source<'_, R>,
    x: &mut Exchange<'_>,
    deadline: Instant,
) -> Result<Response, NoAnswer> {
    let limits = &ctx.rt.settings.limits;
    let mut received = false;
    loop {
        if !server.held.is_empty() {
            if let Some(resp) = response::analyze(
                server.held,
                &x.req.method,
                limits.max_header_bytes,
                limits.max_header_fields,
            )? {
                server.consume(resp.head_len);
                x.responded.get_or_insert_with(Instant::now);
                if !resp.is_interim() {
                    return Ok(resp);
                }
                if x.req.version == Version::Http11 {
                    let head = rewrite::response_head(&resp, ctx.http, false);
                    write_all(client, &head, ctx.l.client_timeout)
                        .await
                        .map_err(|_| Rejection::new(400, "client failed"))?;
                    x.bytes_out += head.len() as u64;
                }
                continue;
            }
        }
        let early = |why| NoAnswer {
            rejection: Rejection::new(502, why),
            closed_early: !received,
        };
        match server.fill(deadline).await {
            Ok(0) => return Err(early("server closed before a complete response head")),
            Ok(_) => received = true,
            Err(ReadError::Timeout) => return Err(NO_HEAD_IN_TIME.into()),
            Err(ReadError::Io(_)) => return Err(early("server connection failed")),
        }
    }
}

/// A new connection to a server of `backend` for a request to `path` (retried on other
/// servers as `retries:` allows: [`crate::dispatch`]).
pub(super) async fn connect_server(
    ctx: &Ctx<'_>,
    backend: usize,
    path: &str,
) -> Result<ServerConn, Rejection> {
    let who = Requester {
        listener: &ctx.l.name,
        client: ctx.peer,
        path: Some(path),
        nodelay: ctx.l.nodelay,
        http: true,
        rcvbuf: ctx.rt.settings.kernel_rcvbuf,
        origin: ctx.origin,
    };
    match dispatch(ctx.rt.backend(backend), who).await {
        Ok((lease, stream)) => Ok(ServerConn {
            conn: Conn::new(stream),
            backend,
            lease,
            idle_since: Instant::now(),
            after_bodiless: false,
        }),
        Err(DispatchError::NoServer) => Err(Rejection::new(503, "no server available")),
        // HAProxy's answer too once its retries are spent.
        Err(DispatchError::Failed { .. }) => Err(Rejection::new(503, "no server could be reached")),
        Err(DispatchError::QueueTimeout(_)) => Err(Rejection::new(
            503,
            "every server stayed at its maxconn for timeouts.queue",
        )),
        Err(DispatchError::Tls { .. }) => Err(Rejection::new(502, "TLS handshake with the server failed")),
    }
}

/// A kept server connection is usable while the server has neither closed it nor sent
/// anything unasked (left-over bytes, say a body to a HEAD, would be read as the next answer).
/// On a TLS connection, both the TLS layer and the socket must be empty.
pub(super) fn still_open(s: &mut ServerConn) -> bool {
    s.conn.held.is_empty()
        && !s.conn.stream.tls_holds_input()
        && matches!(sockopt::peek_nowait(s.conn.stream.as_fd(), &mut [0u8; 1]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}
