//! Head rewriting: the request head lb sends to the server and the response head it sends to
//! the client, built from the analyzed ones.
//!
//! Hop-by-hop fields (RFC 9110 §7.6.1) concern one connection and are not passed on:
//! `Connection` and every field it names, `Keep-Alive`, `Proxy-Connection`, `TE`, and `Upgrade`
//! unless the message is an upgrade. `Transfer-Encoding` stays: lb forwards a chunked body as
//! it came (checked, not re-encoded). Then the forwarding fields (`X-Forwarded-For`,
//! `X-Forwarded-Proto`, `Forwarded`) and the listener's header rules, in order.
use std::net::{IpAddr, SocketAddr};

use super::{request::Request, response::Response, trim_ows, Header, Version};
use crate::config::{HeaderRule, Http};

/// The tokens of every `Connection` field, lowercased.
pub fn connection_tokens(headers: &[Header]) -> Vec<String> {
    headers
        .iter()
        .filter(|h| h.is("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(trim_ows(t)).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether the request asks to switch protocols (`Connection: upgrade` and an `Upgrade`).
pub fn is_upgrade(req: &Request) -> bool {
    req.version == Version::Http11
        && connection_tokens(&req.headers).iter().any(|t| t == "upgrade")
        && req.headers.iter().any(|h| h.is("upgrade"))
}

/// Whether the client wants its connection kept after this request.
pub fn client_keeps_alive(req: &Request) -> bool {
    let tokens = connection_tokens(&req.headers);
    match req.version {
        Version::Http11 => !tokens.iter().any(|t| t == "close"),
        // HTTP/1.0 keep-alive is a later extension lb does not offer.
        Version::Http10 => false,
    }
}

/// Whether the server keeps its connection after this response.
pub fn server_keeps_alive(resp: &Response) -> bool {
    resp.version == Version::Http11 && !connection_tokens(&resp.headers).iter().any(|t| t == "close")
}

/// The fields of `headers` that are not hop-by-hop (`Upgrade` kept when `upgrading`).
fn end_to_end(headers: &[Header], upgrading: bool) -> Vec<Header> {
    let named = connection_tokens(headers);
    headers
        .iter()
        .filter(|h| {
            let name = h.name.to_ascii_lowercase();
            let hop = matches!(
                name.as_str(),
                "connection" | "keep-alive" | "proxy-connection" | "te"
            ) || (name == "upgrade" && !upgrading)
                || (named.contains(&name) && name != "upgrade" && name != "transfer-encoding");
            !hop
        })
        .cloned()
        .collect()
}

/// Applies header rules in order.
fn apply(headers: &mut Vec<Header>, rules: &[HeaderRule]) {
    for rule in rules {
        match rule {
            HeaderRule::Set(name, value) => {
                headers.retain(|h| !h.is(name));
                headers.push(field(name, value.as_bytes()));
            }
            HeaderRule::Add(name, value) => headers.push(field(name, value.as_bytes())),
            HeaderRule::Remove(name) => headers.retain(|h| !h.is(name)),
        }
    }
}

fn field(name: &str, value: &[u8]) -> Header {
    Header {
        name: name.to_string(),
        value: value.to_vec(),
    }
}

/// The request head for the server. `upgrading`: an upgrade request, passed on as one;
/// `expect_handled`: lb answered `Expect: 100-continue` itself, so the field is dropped.
///
/// The request line keeps the client's version, unlike the response's: an HTTP/1.0 client's
/// request sent as 1.1 could get a chunked response that client cannot read.
pub fn request_head(
    req: &Request,
    http: &Http,
    client: SocketAddr,
    upgrading: bool,
    expect_handled: bool,
) -> Vec<u8> {
    let mut headers = end_to_end(&req.headers, upgrading);
    if expect_handled {
        headers.retain(|h| !h.is("expect"));
    }
    let f = http.forwarded;
    if f.x_forwarded_for {
        // One field holding the list, the client last (the convention every reader parses).
        let mut list: Vec<u8> = Vec::new();
        for h in headers.iter().filter(|h| h.is("x-forwarded-for")) {
            list.extend_from_slice(trim_ows(&h.value));
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(client.ip().to_string().as_bytes());
        headers.retain(|h| !h.is("x-forwarded-for"));
        headers.push(field("X-Forwarded-For", &list));
    }
    if f.x_forwarded_proto {
        headers.retain(|h| !h.is("x-forwarded-proto"));
        headers.push(field("X-Forwarded-Proto", b"http"));
    }
    if f.forwarded {
        let node = match client.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("\"[{ip}]\""),
        };
        let element = format!("for={node};proto=http");
        match headers.iter_mut().rfind(|h| h.is("forwarded")) {
            Some(h) => {
                h.value.extend_from_slice(b", ");
                h.value.extend_from_slice(element.as_bytes());
            }
            None => headers.push(field("Forwarded", element.as_bytes())),
        }
    }
    apply(&mut headers, &http.request_rules);
    if upgrading {
        headers.push(field("Connection", b"upgrade"));
    }
    let version = match req.version {
        Version::Http10 => "HTTP/1.0",
        Version::Http11 => "HTTP/1.1",
    };
    serialize(format!("{} {} {version}", req.method, req.target), &headers)
}

/// The response head for the client. `close`: lb closes the client connection after this
/// response (said with `Connection: close`); a 101 keeps its upgrade fields.
pub fn response_head(resp: &Response, http: &Http, close: bool) -> Vec<u8> {
    let switching = resp.status == 101;
    let mut headers = end_to_end(&resp.headers, switching);
    apply(&mut headers, &http.response_rules);
    if switching {
        headers.push(field("Connection", b"upgrade"));
    } else if close {
        headers.push(field("Connection", b"close"));
    }
    // lb is an HTTP/1.1 intermediary: it sends its own version (RFC 9112 §2.3), and says
    // `close` whenever it will close.
    serialize(format!("HTTP/1.1 {} {}", resp.status, resp.reason), &headers)
}

fn serialize(start_line: String, headers: &[Header]) -> Vec<u8> {
    let mut out = start_line.into_bytes();
    out.extend_from_slice(b"\r\n");
    for h in headers {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests;
