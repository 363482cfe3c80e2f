//! The HTTP session's hand-offs to the forwarding stage: what it gives up a connection pair
//! with, and the access-log record written when that pair's flow ends.
//!
//! Two kinds (issue point 6 of the HTTP design): a tunnel after a `101` to an upgrade or a 2xx
//! to a CONNECT (both directions, `timeouts.tunnel`), and the rest of a response body after
//! which lb closes the client connection (the server's bytes only: what the client sends after
//! its request was never analysed, so it must not reach the server).
use std::{net::SocketAddr, time::Instant};

use super::log;
use crate::{
    forward::{Directions, End, Side},
    stream::Stream,
};

/// A client/server pair the HTTP session hands on; every byte lb had read from the side(s)
/// forwarded was passed on first. A pair with a TLS side stays in userspace (no kTLS).
pub struct Handoff {
    pub client: Stream,
    pub server: Stream,
    /// The backend of the exchange (of the generation the connection was on then).
    pub backend: std::sync::Arc<crate::runtime::BackendRt>,
    /// The server's lease ([`crate::balance`]): the flow counts as its session until it ends.
    pub lease: crate::balance::Lease,
    pub kind: Kind,
    /// For the access-log record written when the flow ends.
    pub record: Handed,
}

/// What a hand-off is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// After a 101 or a CONNECT's 2xx: both ways, `timeouts.tunnel` on both sides.
    Tunnel,
    /// The rest of a response body after which lb closes the client connection: the server's
    /// bytes only, under the usual idle timeouts. `left`: what a Content-Length body still
    /// had to come at the hand-off: the most the flow forwards (what a server sends past it is
    /// dropped, and noted in the log).
    ResponseBody { left: Option<u64> },
}

impl Kind {
    pub fn directions(self) -> Directions {
        match self {
            Kind::Tunnel => Directions::Both,
            Kind::ResponseBody { left } => Directions::ServerToClient { limit: left },
        }
    }
}

/// The exchange behind a hand-off, as its access-log record shows it.
pub struct Handed {
    pub method: String,
    pub host: String,
    pub target: String,
    pub status: u16,
    pub format: log::Format,
    /// When lb began to wait for the request.
    pub since: Instant,
    /// Bytes received from the client, and sent to it, before the hand-off.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Milliseconds waiting for the request head, connecting, and until the response head
    /// (as [`log::Record::times`]).
    pub times: [i64; 3],
}

/// What the forwarding stage reports when a handed-off flow ends.
pub struct Ended<'a> {
    pub client: SocketAddr,
    pub listener: &'a str,
    pub backend: &'a str,
    pub server: &'a str,
    /// How the flow ended; `None`: a socket call of the kernel path failed (the pair was reset).
    pub end: Option<End>,
    /// Bytes the kernel redirected, both ways.
    pub kernel_bytes: u64,
    /// Bytes from the server given to the client after the hand-off (by the kernel or lb).
    pub to_client: u64,
    /// Bytes the server sent past its Content-Length, dropped (never given to the client).
    pub past_limit: u64,
}

/// Writes the record of a handed-off flow's end: for a tunnel a second record (`tunnel
/// closed`, `tunnel reset`, `tunnel idle timeout`, with the kernel's bytes and the whole
/// time); for a response body the exchange's one record, with every byte sent to the client.
pub fn log_end(kind: Kind, h: &Handed, e: &Ended<'_>) {
    if !log::wanted(h.format) {
        return;
    }
    let total = h.since.elapsed().as_millis() as i64;
    let (bytes_in, bytes_out, times, note) = match kind {
        Kind::Tunnel => {
            let note = match e.end {
                Some(End::Closed) => "tunnel closed",
                Some(End::Reset(_)) => "tunnel reset",
                Some(End::IdleTimeout(_)) => "tunnel idle timeout",
                None => "tunnel failed",
            };
            (0, 0, [-1, -1, -1, total], note)
        }
        Kind::ResponseBody { left } => {
            let [request, connect, response] = h.times;
            let times = [request, connect, response, total];
            (
                h.bytes_in,
                h.bytes_out + e.to_client,
                times,
                match e.end {
                    Some(end) => body_note(end, left, e.to_client, e.past_limit),
                    None => "kernel forwarding failed after the hand-off",
                },
            )
        }
    };
    log::emit(
        h.format,
        &log::Record {
            client: e.client,
            listener: e.listener,
            method: &h.method,
            host: &h.host,
            target: &h.target,
            status: h.status,
            bytes_in,
            bytes_out,
            kernel_bytes: e.kernel_bytes,
            backend: e.backend,
            server: e.server,
            times,
            note,
        },
    );
}

/// How a handed-off response body's flow ended, when not plainly (empty: it did). A flow can
/// also idle out after a complete body (a client that neither closes nor sends): the record's
/// `out` tells.
fn body_note(end: End, left: Option<u64>, to_client: u64, past_limit: u64) -> &'static str {
    match (end, left) {
        (End::Reset(Side::Server), _) => "server reset after the hand-off",
        (End::Reset(Side::Client), _) => "client reset after the hand-off",
        (End::IdleTimeout(Side::Server), _) => "server idle timeout after the hand-off",
        (End::IdleTimeout(Side::Client), _) => "client idle timeout after the hand-off",
        (End::Closed, Some(left)) if to_client < left && past_limit > 0 => {
            "body cut short: the kernel could not cut the server's segment at its end"
        }
        (End::Closed, Some(left)) if to_client < left => "server closed within the response body",
        (End::Closed, Some(_)) if past_limit > 0 => "server sent past its Content-Length (dropped)",
        (End::Closed, _) => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_body_is_checked_against_its_length_when_it_ends() {
        assert_eq!(body_note(End::Closed, Some(10), 10, 0), "");
        assert_eq!(body_note(End::Closed, None, 12345, 0), "");
        assert_eq!(
            body_note(End::Closed, Some(10), 9, 0),
            "server closed within the response body"
        );
        assert_eq!(
            body_note(End::Closed, Some(10), 10, 5),
            "server sent past its Content-Length (dropped)"
        );
        assert_eq!(
            body_note(End::Reset(Side::Client), Some(10), 10, 0),
            "client reset after the hand-off"
        );
        assert_eq!(
            body_note(End::IdleTimeout(Side::Server), None, 0, 0),
            "server idle timeout after the hand-off"
        );
    }
}
