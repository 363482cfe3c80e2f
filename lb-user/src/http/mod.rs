//! HTTP mode's analyzers (HAProxy's `http_lb_req` and `http_lb_resp`): what lb checks in a
//! message before any byte of it reaches the other side.
//!
//! A proxy that reads a message's framing differently from the server behind it is a
//! request-smuggling hole, so the analyzers are strict where RFC 9112 lets a recipient choose:
//! - [`request`]: the request head (httparse with no leniency, plus the checks httparse leaves
//!   out: CRLF line endings, the request target's form, one Host);
//! - [`framing`]: how long a body is (Content-Length, Transfer-Encoding), refusing every
//!   ambiguous combination;
//! - [`chunked`]: a chunked body, checked as it streams past (sizes, extensions, trailers);
//! - [`response`]: the response head, as strict (a server's mistake is a 502, not passed on).
//!
//! Each refusal is a [`Rejection`]: the status lb answers with, and why (for the log).
//!
//! Around them, the HTTP session: [`session`] (the per-connection supervisor and its states),
//! [`upstream`] (the server side of an exchange), [`duplex`] (the same for a request with a
//! body: its body and the response move at once), [`rewrite`] (the heads sent on),
//! [`transfer`] (held buffers, bodies), [`reply`] (lb's own answers), [`handoff`] (pairs given
//! to the forwarding stage) and [`log`] (the access log).
pub mod chunked;
pub mod duplex;
pub mod framing;
pub mod handoff;
pub mod log;
pub mod reply;
pub mod request;
pub mod response;
pub mod rewrite;
pub mod session;
pub mod transfer;
pub mod upstream;

use std::fmt;

/// Why lb refused a message, and the status it answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    /// What was wrong, for the log (never sent to the peer).
    pub why: &'static str,
}

impl Rejection {
    pub const fn new(status: u16, why: &'static str) -> Rejection {
        Rejection { status, why }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, reason_phrase(self.status), self.why)
    }
}

/// The reason phrase lb sends with a status it generates.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// One header field, as received (the name keeps its case; values may hold obs-text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

impl Header {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// The HTTP/1 minor version of a message (lb speaks HTTP/1.0 and HTTP/1.1 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Checks the line endings of what httparse `parsed` from `buf`: the head when it is complete
/// (the body after it may hold anything), else everything so far. httparse takes a bare LF for
/// a line ending; HTTP/1.1 does not (RFC 9112 §2.2 lets a recipient choose, and a server
/// choosing otherwise would see other lines than lb). Every LF must end a CRLF and every CR
/// start one (a CR at the very end may be waiting for its LF).
pub(crate) fn check_line_endings(buf: &[u8], parsed: &httparse::Result<usize>) -> Result<(), &'static str> {
    let head = match parsed {
        Ok(httparse::Status::Complete(n)) => &buf[..*n],
        _ => buf,
    };
    for (i, &b) in head.iter().enumerate() {
        let ok = match b {
            b'\n' => i > 0 && head[i - 1] == b'\r',
            b'\r' => head.get(i + 1).is_none_or(|&n| n == b'\n'),
            _ => true,
        };
        if !ok {
            return Err("bare CR or LF in the head");
        }
    }
    Ok(())
}

/// The fields httparse found, owned (the held buffer they point into is consumed after).
pub(crate) fn owned_headers(fields: &[httparse::Header<'_>]) -> Vec<Header> {
    fields
        .iter()
        .map(|h| Header {
            name: h.name.to_string(),
            value: h.value.to_vec(),
        })
        .collect()
}

/// Whether `b` is a `tchar` (RFC 9110 §5.6.2): the characters of methods, header names and
/// other tokens.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Optional whitespace (RFC 9110 §5.6.3).
pub(crate) fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `bytes` without leading and trailing optional whitespace.
pub(crate) fn trim_ows(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|&b| !is_ows(b)).map_or(start, |i| i + 1);
    &bytes[start..end]
}
