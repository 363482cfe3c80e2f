//! The server side of an exchange whose request has a body: the body goes to the server while
//! lb reads what the server sends back, so that
//! - an interim answer (`100 Continue` to `Expect: 100-continue`) reaches the client while it
//!   waits to send the body;
//! - an early final answer (a 413 or 401 before the upload is over) reaches the client at once,
//!   and the upload stops when the server closes;
//! - a server that streams its answer while it reads (full duplex) is served both ways.
//!
//! When the body went whole before the final response head, the exchange goes on as for a
//! request without a body ([`super::upstream::send_request`]'s [`Sent::Answered`]). Otherwise
//! (an early answer) the response is forwarded here, alongside what remains of the upload, and
//! the client connection is closed after it: its request was not read to the end. Drawn in
//! ../LIFECYCLE.md.
use std::io;
use tokio::time::Instant;

use super::{
    response::Response,
    rewrite,
    session::{access_log, body_fault, count, Ctx, Exchange},
    transfer::{self, forward_message, BodyError, Bounds, Conn, Moved, Progress},
    upstream::{connect_server, read_response, NoAnswer, Sent, ServerConn, NO_HEAD_IN_TIME},
    Rejection,
};

/// How the race between the upload and the response head ended.
enum Head {
    /// The final head came; the upload's end if it ended before.
    Came(Response),
    /// No head (none, a malformed one, none in time).
    None(NoAnswer),
    /// The client's side of the upload failed (closed, stalled, malformed, too large).
    ClientFault(BodyError),
}

/// Sends the request head and its body to a server of the exchange's backend (the kept
/// connection when there is one) while reading the response head; an early answer is
/// forwarded here (see the module's documentation).
pub(super) async fn send_with_body(
    ctx: &Ctx<'_>,
    client: &mut Conn,
    reused: Option<ServerConn>,
    head: &[u8],
    x: &mut Exchange<'_>,
) -> Sent {
    let mut server = match reused {
        Some(s) => s,
        None => match connect_server(ctx, x.backend, &x.req.path).await {
            Ok(s) => s,
            Err(r) => return Sent::Refused(r),
        },
    };
    x.server_idx = Some(server.lease.index());
    x.connected = Some(Instant::now());
    let backend = ctx.rt.backend(x.backend).clone();
    let (client_idle, server_idle) = (ctx.l.client_timeout, backend.config.server_timeout);
    let body = x.req.body;
    let max = ctx.rt.settings.limits.max_body_bytes;
    let (mut up, mut down) = (Progress::default(), Progress::default());
    // The upload's end, once it ended without a fault of the client's.
    let mut sent: Option<Result<Moved, BodyError>> = None;
    let mut early_head_len = 0u64;
    let (head_came, early) = {
        let (mut client_src, mut client_w) = client.split();
        let (mut server_src, mut server_w) = server.conn.split();
        let mut upload = Box::pin(forward_message(
            &mut client_src,
            &mut server_w,
            head.into(),
            body,
            (client_idle, server_idle),
            Bounds {
                max,
                hand_off_after: None,
            },
            &mut up,
        ));
        // `timeouts.server` for the head runs from the upload's end: until then the server is
        // receiving, and the upload's own reads and writes have their idle limits.
        let mut answer = Box::pin(read_response(ctx, &mut client_w, &mut server_src, x, far_off()));
        let timer = tokio::time::sleep_until(far_off());
        tokio::pin!(timer);
        let head_came = loop {
            tokio::select! {
                // The upload first: a request that went whole just as the head came goes on
                // as a normal exchange (kept alive), not as an early answer.
                biased;
                r = &mut upload, if sent.is_none() => match r {
                    // The server stopped reading: it may have answered (a 413 and a close).
                    Ok(_) | Err(BodyError::Destination(_)) => {
                        sent = Some(r);
                        timer.as_mut().reset(Instant::now() + server_idle);
                    }
                    Err(e) => break Head::ClientFault(e),
                },
                a = &mut answer => break match a {
                    Ok(resp) => Head::Came(resp),
                    Err(no) => Head::None(no),
                },
                () = &mut timer => break Head::None(NO_HEAD_IN_TIME.into()),
            }
        };
        drop(answer);
        let early = match &head_came {
            // An early answer: forwarded now, the upload going on alongside. The client
            // connection closes after it, so the head says so.
            Head::Came(resp) if !matches!(sent, Some(Ok(_))) && !switching(resp, x) => {
                let rhead = rewrite::response_head(resp, ctx.http, true);
                early_head_len = rhead.len() as u64;
                let mut forward = Box::pin(forward_message(
                    &mut server_src,
                    &mut client_w,
                    rhead.into(),
                    resp.body,
                    (server_idle, client_idle),
                    Bounds::default(),
                    &mut down,
                ));
                // Once the answer goes, a client that stops its upload (as curl does after
                // an early 413, or by a half-close) cuts nothing: the upload just ends there.
                Some(loop {
                    tokio::select! {
                        r = &mut upload, if sent.is_none() => sent = Some(r),
                        m = &mut forward => break m,
                    }
                })
            }
            _ => None,
        };
        (head_came, early)
    };
    x.bytes_in += up.body;
    let whole = matches!(sent, Some(Ok(_)));
    let resp = match head_came {
        Head::ClientFault(e) => {
            transfer::cut(server.conn.stream);
            return Sent::Refused(client_fault(&e));
        }
        Head::None(no) => {
            let rejection = match sent {
                Some(Err(_)) => Rejection::new(502, "server failed while receiving the request"),
                _ => no.rejection,
            };
            if rejection.status >= 500 {
                server.lease.observe(false, &backend.config);
            }
            if !whole {
                transfer::cut(server.conn.stream);
            }
            return Sent::Refused(rejection);
        }
        Head::Came(resp) => resp,
    };
    let Some(early) = early else {
        if whole {
            server.lease.observe(resp.status < 500, &backend.config);
            return Sent::Answered(server, resp);
        }
        // A 101 (or a CONNECT's 2xx) before the request went: nothing to tunnel.
        server.lease.observe(false, &backend.config);
        transfer::cut(server.conn.stream);
        return Sent::Refused(Rejection::new(
            502,
            "switching protocols before the request body went",
        ));
    };
    if down.head {
        count(ctx, resp.status);
        x.bytes_out += early_head_len + down.body;
    }
    // (A malformed body is the server's fault too.)
    let fine = resp.status < 500 && !matches!(early, Err(BodyError::Malformed(_)));
    server.lease.observe(fine, &backend.config);
    let (sent_on, note) = match early {
        Ok(_) => {
            let note = if whole {
                ""
            } else {
                "answered before the request body went"
            };
            access_log(ctx, x, resp.status, note, 0);
            (
                Sent::Over {
                    why: "closed after an early answer",
                    cut: false,
                },
                note,
            )
        }
        // Nothing of the response went (not a byte): the client gets an answer of lb's.
        Err(e) if !down.started => (Sent::Refused(Rejection::new(502, body_fault(&e))), ""),
        Err(e) => {
            let why = body_fault(&e);
            access_log(ctx, x, resp.status, why, 0);
            (Sent::Over { why, cut: true }, why)
        }
    };
    // A server left with an incomplete request, or whose answer was cut, is reset: it cannot
    // take what it got for a whole request.
    if whole && note.is_empty() {
        drop(server);
    } else {
        transfer::cut(server.conn.stream);
    }
    sent_on
}

/// A deadline no wait reaches (a year on).
fn far_off() -> Instant {
    Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600)
}

/// A response that would turn the connection into a tunnel (a 101, a CONNECT's 2xx).
fn switching(resp: &Response, x: &Exchange<'_>) -> bool {
    resp.status == 101 || (x.req.method == "CONNECT" && (200..300).contains(&resp.status))
}

/// The answer to a request body the client did not send whole.
fn client_fault(e: &BodyError) -> Rejection {
    match e {
        BodyError::Malformed(_) => Rejection::new(400, "malformed chunked request body"),
        BodyError::TooLarge => Rejection::new(413, "request body above limits.max_body_bytes"),
        BodyError::Source(e) if e.kind() == io::ErrorKind::TimedOut => {
            Rejection::new(408, "request body stalled for timeouts.client")
        }
        BodyError::Source(_) => Rejection::new(400, "client closed within the request body"),
        // Not the client's (the caller matched the server's failures first).
        BodyError::Destination(_) => Rejection::new(502, "server failed while receiving the request"),
    }
}
