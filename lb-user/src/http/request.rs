//! The request analyzer (HAProxy's `http_lb_req`): decides whether the bytes held for a
//! request form a complete, acceptable head, before lb routes it or connects anywhere.
//!
//! "Incomplete" is not an error: [`analyze`] answers `Ok(None)` until the head's final CRLF is
//! in, unless the head has outgrown `limits.max_header_bytes` (414 while the request line is
//! still unfinished, 431 after). httparse parses the head with none of its leniency options;
//! lb adds what httparse lets through: a bare LF as a line ending, non-ASCII bytes in the
//! target, a target whose form does not fit the method, a missing or repeated Host.
use super::{check_line_endings, framing, framing::Body, owned_headers, Header, Rejection, Version};

/// Most header fields in one head by default (`limits.max_header_fields`; HAProxy's
/// `tune.http.maxhdr` is 101).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// The most `limits.max_header_fields` may be: the parser's field slots live on the stack,
/// uninitialized (32 bytes each), so a larger limit costs nothing per request.
pub const MAX_MAX_HEADERS: usize = 1000;

/// The limits a request head and body are held to (`limits:` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line and header fields together, in bytes.
    pub max_header_bytes: usize,
    /// Largest body, when bounded.
    pub max_body_bytes: Option<u64>,
    /// Most header fields in a head (at most [`MAX_MAX_HEADERS`]): 431 above.
    pub max_header_fields: usize,
}

/// An accepted request head.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub version: Version,
    pub headers: Vec<Header>,
    /// Bytes of the head, final CRLF included: the body (or the next request) starts there.
    pub head_len: usize,
    pub body: Body,
    /// The host the request is for, lowercased, without port: the authority of an
    /// absolute-form or authority-form target, else the Host field (for routing).
    pub host: Option<String>,
    /// The authority of an absolute-form target, as written: the Host lb sends in place of the
    /// client's (RFC 9112 §3.2.2), so the server sees the host lb routed on.
    pub target_authority: Option<String>,
    /// The target's path as routes see it: without query, with percent-encoded unreserved
    /// characters decoded and dot-segments resolved (`/pub/../%69nternal` is `/internal`), so
    /// a server that normalizes paths cannot be reached past a route by spelling.
    pub path: String,
}

/// Analyzes the held bytes `buf`: `Ok(None)` while the head is incomplete and within limits.
pub fn analyze(buf: &[u8], limits: &Limits) -> Result<Option<Request>, Rejection> {
    let bad = |why| Rejection::new(400, why);
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed =
        req.parse_with_uninit_headers(buf, &mut fields[..limits.max_header_fields.min(MAX_MAX_HEADERS)]);
    check_line_endings(buf, &parsed).map_err(|why| Rejection::new(400, why))?;
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() < limits.max_header_bytes {
                Ok(None)
            } else {
                Err(too_large(buf, limits))
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Rejection::new(431, "too many header fields")),
        Err(httparse::Error::Version) => return Err(version_error(buf)),
        Err(httparse::Error::Token) => return Err(bad("malformed method or request line")),
        Err(httparse::Error::HeaderName) => return Err(bad("malformed header name (whitespace, obs-fold)")),
        Err(httparse::Error::HeaderValue) => return Err(bad("control character in a header value")),
        Err(httparse::Error::NewLine) => return Err(bad("CR without LF")),
        Err(_) => return Err(bad("malformed request line")),
    };
    if head_len > limits.max_header_bytes {
        return Err(too_large(buf, limits));
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(bad("malformed request line"));
    };
    let version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    let headers = owned_headers(req.headers);
    let authority = check_target(method, target)?;
    let host = host(&headers, version)?;
    let body = framing::request_body(&headers, version, limits.max_body_bytes)?;
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        version,
        head_len,
        body,
        host: authority.as_ref().or(host.as_ref()).map(|a| host_name(a)),
        target_authority: authority.filter(|_| !target.starts_with('/') && method != "CONNECT"),
        path: routing_path(target),
        headers,
    }))
}

/// See [`Request::path`]. Authority-form and `*` targets have no path: `""`.
fn routing_path(target: &str) -> String {
    let path = if target.starts_with('/') {
        target
    } else if let Some(i) = target.find("://") {
        // Absolute-form (checked by now): the path starts at the first `/` after the authority.
        let rest = &target[i + 3..];
        rest.find(['/', '?']).map_or("/", |p| {
            if rest[p..].starts_with('/') {
                &rest[p..]
            } else {
                "/"
            }
        })
    } else {
        return String::new();
    };
    let path = path.split('?').next().unwrap_or("");
    if !path.contains('%') && !path.contains("/.") {
        // Nothing to normalize (the common case): one copy.
        return path.to_string();
    }
    remove_dot_segments(&decode_unreserved(path))
}

/// Percent-encoded unreserved characters (RFC 3986 §2.3) decoded; every other escape kept.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .filter(|&b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        match decoded {
            Some(b) => {
                out.push(b as char);
                i += 3;
            }
            None => {
                out.push(bytes[i] as char);
                i += 1;
            }
        }
    }
    out
}

/// RFC 3986 §5.2.4 for a path starting with `/`.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        // A final `.` or `..` leaves a directory: `/a/..` is `/`, `/a/.` is `/a/`.
        if last && (*seg == "." || *seg == "..") {
            out.push("");
        }
    }
    format!("/{}", out.join("/"))
}

/// 414 while the request line has not ended within the limit, 431 after.
fn too_large(buf: &[u8], limits: &Limits) -> Rejection {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(0);
    match buf[start..].iter().position(|&b| b == b'\n') {
        Some(i) if start + i < limits.max_header_bytes => {
            Rejection::new(431, "request head above limits.max_header_bytes")
        }
        _ => Rejection::new(414, "request line above limits.max_header_bytes"),
    }
}

/// httparse knows only HTTP/1.0 and HTTP/1.1: another well-formed version is 505, anything
/// else in its place 400.
fn version_error(buf: &[u8]) -> Rejection {
    let line = buf
        .split(|&b| b == b'\r' || b == b'\n')
        .find(|l| !l.is_empty())
        .unwrap_or(&[]);
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    // Anything but `method SP target SP version` failed earlier than the version.
    let [_, _, version] = parts[..] else {
        return Rejection::new(400, "malformed request line");
    };
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Rejection::new(505, "HTTP version other than 1.0 and 1.1")
        }
        [b'H', b'T', b'T', b'P', b'/', major] if major.is_ascii_digit() => {
            Rejection::new(505, "HTTP version other than 1.0 and 1.1")
        }
        _ => Rejection::new(400, "malformed HTTP version"),
    }
}

/// Checks the request target's form against the method (RFC 9112 §3.2); returns the authority
/// it names, if any.
fn check_target(method: &str, target: &str) -> Result<Option<String>, Rejection> {
    let bad = |why| Err(Rejection::new(400, why));
    if !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return bad("non-ASCII or control bytes in the target");
    }
    if target.contains('#') {
        return bad("fragment in the target");
    }
    if method == "CONNECT" {
        // authority-form: host:port, nothing else.
        return match target.rsplit_once(':') {
            Some((host, port))
                if valid_host(host) && valid_port(port) && !host.is_empty() && !port.is_empty() =>
            {
                Ok(Some(target.to_string()))
            }
            _ => bad("CONNECT target is not host:port"),
        };
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(None)
        } else {
            bad("* target with a method other than OPTIONS")
        };
    }
    if target.starts_with('/') {
        return Ok(None);
    }
    // absolute-form: http(s)://authority[/path][?query]
    let lower = target.to_ascii_lowercase();
    let scheme = ["http://", "https://"].into_iter().find(|s| lower.starts_with(s));
    let Some(scheme) = scheme else {
        return bad("target is neither origin-form nor absolute-form");
    };
    let rest = &target[scheme.len()..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() || !valid_authority(authority) {
        return bad("malformed authority in the target");
    }
    Ok(Some(authority.to_string()))
}

/// The Host field: exactly one in HTTP/1.1, at most one in HTTP/1.0 (RFC 9112 §3.2), and a
/// well-formed authority (or empty).
fn host(headers: &[Header], version: Version) -> Result<Option<String>, Rejection> {
    let mut hosts = headers.iter().filter(|h| h.is("host"));
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(Rejection::new(400, "more than one Host"));
    }
    let Some(first) = first else {
        return match version {
            Version::Http11 => Err(Rejection::new(400, "no Host in an HTTP/1.1 request")),
            Version::Http10 => Ok(None),
        };
    };
    let value = std::str::from_utf8(&first.value).map_err(|_| Rejection::new(400, "malformed Host"))?;
    if value.is_empty() {
        return Ok(None);
    }
    if !valid_authority(value) {
        return Err(Rejection::new(400, "malformed Host"));
    }
    Ok(Some(value.to_string()))
}

/// `uri-host [ ":" port ]` without userinfo (RFC 9110 §7.2).
fn valid_authority(a: &str) -> bool {
    let (host, port) = match a.rsplit_once(':') {
        // An IPv6 literal holds colons of its own.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (a, None),
    };
    valid_host(host) && !host.is_empty() && port.is_none_or(valid_port)
}

fn valid_host(host: &str) -> bool {
    if let Some(literal) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return !literal.is_empty()
            && literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    // reg-name / IPv4address: unreserved / pct-encoded / sub-delims.
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b))
}

fn valid_port(port: &str) -> bool {
    port.bytes().all(|b| b.is_ascii_digit()) && port.len() <= 5
}

/// The host part of an authority, lowercased (routing ignores the port and case).
fn host_name(authority: &str) -> String {
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => h,
        _ => authority,
    };
    host.to_ascii_lowercase()
}

#[cfg(test)]
mod tests;
