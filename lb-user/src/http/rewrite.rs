//! Head rewriting: the request head lb sends to the server and the response head it sends to
//! the client, built from the analyzed ones.
//!
//! Hop-by-hop fields (RFC 9110 §7.6.1) concern one connection and are not passed on:
//! `Connection` and every field it names, `Keep-Alive`, `Proxy-Connection`, `TE`, and `Upgrade`
//! unless the message is an upgrade. `Transfer-Encoding` stays: lb forwards a chunked body as
//! it came (checked, not re-encoded). Then the forwarding fields (`X-Forwarded-For`,
//! `X-Forwarded-Proto`, `Forwarded`) and the listener's header rules, in order.
use std::borrow::Cow;

use super::{framing::Body, request::Request, response::Response, trim_ows, Header, Version};
use crate::config::{HeaderRule, Http};

/// The tokens of every `Connection` field (trimmed, as received: compare them ignoring case).
fn connection_tokens(headers: &[Header]) -> impl Iterator<Item = &[u8]> {
    headers
        .iter()
        .filter(|h| h.is("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

fn has_connection_token(headers: &[Header], token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the request asks to switch protocols (`Connection: upgrade` and an `Upgrade`).
///
/// Not an upgrade to `h2c` (cleartext HTTP/2): through a tunnel, the client would send HTTP/2
/// requests the server answers and lb never analyzes or routes ("h2c smuggling"). Its Upgrade
/// field is then dropped like any hop-by-hop one, and the request is an ordinary one.
pub fn is_upgrade(req: &Request) -> bool {
    let h2c = req
        .headers
        .iter()
        .filter(|h| h.is("upgrade"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|p| trim_ows(p).eq_ignore_ascii_case(b"h2c"));
    req.version == Version::Http11
        && !h2c
        && has_connection_token(&req.headers, "upgrade")
        && req.headers.iter().any(|h| h.is("upgrade"))
}

/// One `Content-Length` field for a body of `n` bytes, in place of what the sender wrote
/// (repeated fields, or a list of equal values): the framing lb checked, in the one form every
/// recipient reads alike.
fn normalize_length(fields: &mut Vec<Field<'_>>, body: Body) {
    if let Body::Length(n) = body {
        fields.retain(|f| !f.is("content-length"));
        fields.push(added("Content-Length", n.to_string().into_bytes()));
    }
}

/// Whether the client wants its connection kept after this request.
pub fn client_keeps_alive(req: &Request) -> bool {
    match req.version {
        Version::Http11 => !has_connection_token(&req.headers, "close"),
        // HTTP/1.0 keep-alive is a later extension lb does not offer.
        Version::Http10 => false,
    }
}

/// Whether the server keeps its connection after this response.
pub fn server_keeps_alive(resp: &Response) -> bool {
    resp.version == Version::Http11 && !has_connection_token(&resp.headers, "close")
}

/// A field of the head being built: borrowed from the analyzed message, or added by lb.
struct Field<'a> {
    name: Cow<'a, str>,
    value: Cow<'a, [u8]>,
}

impl Field<'_> {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

fn added<'a>(name: &'a str, value: impl Into<Cow<'a, [u8]>>) -> Field<'a> {
    Field {
        name: Cow::Borrowed(name),
        value: value.into(),
    }
}

/// Fields a `Connection` header cannot make hop-by-hop: they frame the message or name its
/// host, and the analyzers judged the message with them. Dropping one because the sender
/// listed it (`Connection: Content-Length`) would forward a body the server cannot delimit:
/// request smuggling.
const NEVER_HOP_BY_HOP: [&str; 4] = ["content-length", "transfer-encoding", "host", "upgrade"];

/// The fields of `headers` that are not hop-by-hop (`Upgrade` kept when `upgrading`), borrowed.
fn end_to_end(headers: &[Header], upgrading: bool) -> Vec<Field<'_>> {
    let named: Vec<&[u8]> = connection_tokens(headers).collect();
    headers
        .iter()
        .filter(|h| {
            let hop = ["connection", "keep-alive", "proxy-connection", "te"]
                .iter()
                .any(|n| h.is(n))
                || (h.is("upgrade") && !upgrading)
                || (named.iter().any(|n| h.name.as_bytes().eq_ignore_ascii_case(n))
                    && !NEVER_HOP_BY_HOP.iter().any(|n| h.is(n)));
            !hop
        })
        .map(|h| Field {
            name: Cow::Borrowed(h.name.as_str()),
            value: Cow::Borrowed(h.value.as_slice()),
        })
        .collect()
}

/// Applies header rules in order.
fn apply<'a>(fields: &mut Vec<Field<'a>>, rules: &'a [HeaderRule]) {
    for rule in rules {
        match rule {
            HeaderRule::Set(name, value) => {
                fields.retain(|f| !f.is(name));
                fields.push(added(name, value.as_bytes()));
            }
            HeaderRule::Add(name, value) => fields.push(added(name, value.as_bytes())),
            HeaderRule::Remove(name) => fields.retain(|f| !f.is(name)),
        }
    }
}

/// The request head for the server; `client_ip`: the client's address as text (the forwarding
/// fields carry it); `tls_in_front`: the client came over TLS to a load balancer in front of
/// lb (a PROXY header's SSL TLV), so the scheme the fields give is `https`. `upgrading`: an
/// upgrade request, passed on as one. `Expect: 100-continue` goes on, and the server's 100 (or
/// final answer) comes back, except from an HTTP/1.0 client: a proxy must not pass it on then
/// (RFC 9110 §10.1.1).
///
/// The request line keeps the client's version, unlike the response's: an HTTP/1.0 client's
/// request sent as 1.1 could get a chunked response that client cannot read.
pub fn request_head(
    req: &Request,
    http: &Http,
    client_ip: &str,
    tls_in_front: bool,
    upgrading: bool,
) -> Vec<u8> {
    let mut fields = end_to_end(&req.headers, upgrading);
    if let Some(authority) = &req.target_authority {
        // An absolute-form target names the host: the Host sent is that one (RFC 9112 §3.2.2).
        fields.retain(|f| !f.is("host"));
        fields.insert(0, added("Host", authority.as_bytes()));
    }
    normalize_length(&mut fields, req.body);
    if req.version == Version::Http10 {
        fields.retain(|f| !f.is("expect"));
    }
    let f = http.forwarded;
    let scheme = if http.https || tls_in_front {
        "https"
    } else {
        "http"
    };
    if f.x_forwarded_for {
        // One field holding the list, the client last (the convention every reader parses).
        let mut list: Vec<u8> = Vec::new();
        for h in fields.iter().filter(|h| h.is("x-forwarded-for")) {
            list.extend_from_slice(trim_ows(&h.value));
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(client_ip.as_bytes());
        fields.retain(|h| !h.is("x-forwarded-for"));
        fields.push(added("X-Forwarded-For", list));
    }
    if f.x_forwarded_proto {
        fields.retain(|h| !h.is("x-forwarded-proto"));
        fields.push(added("X-Forwarded-Proto", scheme.as_bytes()));
    }
    if f.forwarded {
        // RFC 7239: an IPv6 node is quoted and bracketed.
        let element = if client_ip.contains(':') {
            format!("for=\"[{client_ip}]\";proto={scheme}")
        } else {
            format!("for={client_ip};proto={scheme}")
        };
        match fields.iter_mut().rfind(|h| h.is("forwarded")) {
            Some(h) => {
                let value = h.value.to_mut();
                value.extend_from_slice(b", ");
                value.extend_from_slice(element.as_bytes());
            }
            None => fields.push(added("Forwarded", element.into_bytes())),
        }
    }
    apply(&mut fields, &http.request_rules);
    if upgrading {
        fields.push(added("Connection", &b"upgrade"[..]));
    } else if req.version == Version::Http11 && !client_keeps_alive(req) {
        // lb closes the client connection after this exchange, so the server connection goes
        // too: the server is asked to close it, which ends the response's flow cleanly once
        // its body went (a body handed to the kernel, where lb no longer counts its bytes).
        // An HTTP/1.0 request means it already.
        fields.push(added("Connection", &b"close"[..]));
    }
    let version = match req.version {
        Version::Http10 => "HTTP/1.0",
        Version::Http11 => "HTTP/1.1",
    };
    serialize(
        &[req.method.as_str(), " ", req.target.as_str(), " ", version],
        &fields,
    )
}

/// The response head for the client. `close`: lb closes the client connection after this
/// response (said with `Connection: close`); a 101 keeps its upgrade fields.
pub fn response_head(resp: &Response, http: &Http, close: bool) -> Vec<u8> {
    let switching = resp.status == 101;
    let mut fields = end_to_end(&resp.headers, switching);
    normalize_length(&mut fields, resp.body);
    if (100..200).contains(&resp.status) || resp.status == 204 {
        // These never have a body, and must not say otherwise (RFC 9110 §8.6, RFC 9112 §6.1);
        // a 304's or a HEAD answer's Content-Length tells the size of the body not sent.
        fields.retain(|f| !f.is("content-length") && !f.is("transfer-encoding"));
    }
    apply(&mut fields, &http.response_rules);
    if switching {
        fields.push(added("Connection", &b"upgrade"[..]));
    } else if close {
        fields.push(added("Connection", &b"close"[..]));
    }
    // lb is an HTTP/1.1 intermediary: it sends its own version (RFC 9112 §2.3), and says
    // `close` whenever it will close.
    let code = itoa_status(resp.status);
    serialize(&["HTTP/1.1 ", code.as_str(), " ", resp.reason.as_str()], &fields)
}

/// A status code as text, without the formatting machinery (this runs for every response).
fn itoa_status(status: u16) -> String {
    let digits = [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    String::from_utf8_lossy(&digits).into_owned()
}

/// The start line from its parts, then each field, into one buffer sized once.
fn serialize(start_line: &[&str], fields: &[Field<'_>]) -> Vec<u8> {
    let len = start_line.iter().map(|p| p.len()).sum::<usize>()
        + fields
            .iter()
            .map(|f| f.name.len() + f.value.len() + 4)
            .sum::<usize>()
        + 4;
    let mut out = Vec::with_capacity(len);
    for part in start_line {
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for f in fields {
        out.extend_from_slice(f.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&f.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests;
