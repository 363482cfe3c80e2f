//! The HTTP settings of the configuration, validated: a `mode: http` listener's routes,
//! forwarding headers, header rules and timeouts, and the top-level `limits:`.
use super::{
    locate::Step,
    raw::{RawForwarded, RawHeaderRule, RawLimits, RawListener, RawRoute, RawTimeouts},
    with, Validator,
};
use crate::http::{
    is_tchar,
    log::Format,
    request::{Limits, DEFAULT_MAX_HEADERS, MAX_MAX_HEADERS},
};
use std::{collections::HashMap, time::Duration};

const DEFAULT_HTTP_REQUEST: Duration = Duration::from_secs(10);
const DEFAULT_TUNNEL: Duration = Duration::from_secs(3600);
const DEFAULT_MAX_HEADER_BYTES: u64 = 16 << 10;
/// A head is held whole in memory while it is analyzed.
const MAX_MAX_HEADER_BYTES: u64 = 1 << 20;
/// Below this not even a modest request line and a few fields fit.
const MIN_MAX_HEADER_BYTES: u64 = 1 << 10;

/// Fields header rules may not touch.
const CONNECTION_FIELDS: [&str; 6] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
];

/// The HTTP side of a `mode: http` listener.
#[derive(Debug, Clone)]
pub struct Http {
    /// Tried in order; the first match picks the backend, else the listener's `backend`.
    pub routes: Vec<Route>,
    pub forwarded: Forwarded,
    pub request_rules: Vec<HeaderRule>,
    pub response_rules: Vec<HeaderRule>,
    /// `timeouts.http_request`: a whole request head must arrive within it (408).
    pub request_timeout: Duration,
    /// `timeouts.http_keep_alive`: a kept-alive connection waits this long for its next request.
    pub keep_alive_timeout: Duration,
    /// `timeouts.tunnel`: idle limit of a tunnel after an upgrade or a CONNECT.
    pub tunnel_timeout: Duration,
    /// `access_log`: text, json or off.
    pub access_log: Format,
    /// The listener terminates TLS: the scheme the forwarding fields tell is `https`.
    pub https: bool,
}

/// One route.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: Option<HostMatch>,
    /// The TLS handshake's SNI (listeners with `tls:`).
    pub sni: Option<HostMatch>,
    pub path_prefix: Option<String>,
    /// Index into [`super::Config::backends`].
    pub backend: usize,
}

/// How a route matches the request's host (lowercase, without port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any name ending with it.
    Suffix(String),
}

impl Route {
    /// Whether a request for `host` (lowercase, without port), on a connection whose client
    /// asked for `sni` (lowercase), and routing `path` (see
    /// [`crate::http::request::Request::path`]) matches.
    pub fn matches(&self, host: Option<&str>, sni: Option<&str>, path: &str) -> bool {
        HostMatch::admits(self.host.as_ref(), host)
            && HostMatch::admits(self.sni.as_ref(), sni)
            && self.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
    }
}

impl HostMatch {
    /// Whether `name` passes `m` (no matcher: any name, or none).
    pub(crate) fn admits(m: Option<&HostMatch>, name: Option<&str>) -> bool {
        match (m, name) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(HostMatch::Exact(h)), Some(name)) => h == name,
            (Some(HostMatch::Suffix(s)), Some(name)) => name.len() > s.len() && name.ends_with(s.as_str()),
        }
    }
}

/// Which forwarding headers lb adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    pub x_forwarded_for: bool,
    pub x_forwarded_proto: bool,
    pub forwarded: bool,
}

/// A header rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderRule {
    /// Replace every field of that name by one with this value.
    Set(String, String),
    /// Append a field.
    Add(String, String),
    /// Drop every field of that name.
    Remove(String),
}

impl Validator<'_> {
    /// The top-level `limits:`.
    pub(super) fn limits(&mut self, raw: &RawLimits) -> Limits {
        let max_header = raw
            .max_header_bytes
            .map_or(DEFAULT_MAX_HEADER_BYTES, |b| b.as_u64());
        if !(MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&max_header) {
            self.error(
                &[Step::Key("limits"), Step::Key("max_header_bytes")],
                "limits.max_header_bytes must be between 1KiB and 1MiB",
            );
        }
        let max_fields = raw
            .max_header_fields
            .map_or(DEFAULT_MAX_HEADERS as u64, u64::from);
        if !(1..=MAX_MAX_HEADERS as u64).contains(&max_fields) {
            self.error(
                &[Step::Key("limits"), Step::Key("max_header_fields")],
                format!("limits.max_header_fields must be between 1 and {MAX_MAX_HEADERS}"),
            );
        }
        Limits {
            max_header_bytes: max_header.clamp(MIN_MAX_HEADER_BYTES, MAX_MAX_HEADER_BYTES) as usize,
            max_body_bytes: raw.max_body_bytes.map(|b| b.as_u64()),
            max_header_fields: max_fields.clamp(1, MAX_MAX_HEADERS as u64) as usize,
        }
    }

    /// The HTTP side of a listener: `Some` for `mode: http`; for `mode: tcp` every HTTP key is
    /// an error.
    pub(super) fn http_listener(
        &mut self,
        path: &[Step],
        l: &RawListener,
        http: bool,
        backends: &HashMap<String, usize>,
        defaults: &RawTimeouts,
    ) -> Option<Http> {
        if !http {
            let keys = [
                ("routes", !l.routes.is_empty()),
                ("forwarded", l.forwarded.is_some()),
                ("request_headers", !l.request_headers.is_empty()),
                ("response_headers", !l.response_headers.is_empty()),
                ("access_log", l.access_log.is_some()),
            ];
            for (key, set) in keys {
                if set {
                    self.error(
                        &with(path, Step::Key(key)),
                        format!("{key}: only for `mode: http` listeners"),
                    );
                }
            }
            return None;
        }
        let routes = l
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                self.route(
                    &with(&with(path, Step::Key("routes")), Step::Index(i)),
                    r,
                    backends,
                    l.tls.is_some(),
                )
            })
            .collect();
        let forwarded = forwarded(l.forwarded.as_ref());
        let request_rules = self.header_rules(&with(path, Step::Key("request_headers")), &l.request_headers);
        let response_rules =
            self.header_rules(&with(path, Step::Key("response_headers")), &l.response_headers);
        let own = l.timeouts.as_ref();
        let pick = |f: fn(&RawTimeouts) -> Option<Duration>| own.and_then(f).or(f(defaults));
        let request_timeout = pick(|t| t.http_request).unwrap_or(DEFAULT_HTTP_REQUEST);
        let access_log = match l.access_log.as_deref() {
            None | Some("text") => Format::Text,
            Some("json") => Format::Json,
            Some("off") => Format::Off,
            Some(other) => {
                self.error(
                    &with(path, Step::Key("access_log")),
                    format!("access_log: `{other}` is not a format; expected text, json or off"),
                );
                Format::Text
            }
        };
        Some(Http {
            routes,
            forwarded,
            request_rules,
            response_rules,
            request_timeout,
            keep_alive_timeout: pick(|t| t.http_keep_alive).unwrap_or(request_timeout),
            tunnel_timeout: pick(|t| t.tunnel).unwrap_or(DEFAULT_TUNNEL),
            access_log,
            https: false,
        })
    }

    /// A `host:` or `sni:` of a route: a name or `*.suffix`.
    pub(super) fn host_match(&mut self, path: &[Step], key: &str, h: &str) -> HostMatch {
        let lower = h.to_ascii_lowercase();
        let (matcher, name) = match lower.strip_prefix('*') {
            Some(suffix) => (
                HostMatch::Suffix(suffix.to_string()),
                suffix.strip_prefix('.').unwrap_or(""),
            ),
            None => (HostMatch::Exact(lower.clone()), lower.as_str()),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~[]:".contains(&b))
            && !name.starts_with('.');
        if !valid || matches!(&matcher, HostMatch::Suffix(s) if !s.starts_with('.')) {
            self.error(
                path,
                format!("{key}: `{h}` is not a host name or `*.suffix` (and no port: routing ignores it)"),
            );
        }
        matcher
    }

    fn route(&mut self, path: &[Step], r: &RawRoute, backends: &HashMap<String, usize>, tls: bool) -> Route {
        if r.host.is_none() && r.sni.is_none() && r.path_prefix.is_none() {
            self.error(
                path,
                "a route needs `host`, `sni`, `path_prefix`, or several of them",
            );
        }
        let host = r
            .host
            .as_deref()
            .map(|h| self.host_match(&with(path, Step::Key("host")), "host", h));
        let sni = r
            .sni
            .as_deref()
            .map(|h| self.host_match(&with(path, Step::Key("sni")), "sni", h));
        if sni.is_some() && !tls {
            self.error(
                &with(path, Step::Key("sni")),
                "sni: this listener has no `tls:`, so its clients send no SNI",
            );
        }
        if let Some(p) = &r.path_prefix {
            if !p.starts_with('/') || !p.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                self.error(
                    &with(path, Step::Key("path_prefix")),
                    format!("path_prefix: `{p}` must start with / and hold no spaces or control bytes"),
                );
            }
        }
        let backend = self.backend_named(path, backends, "route", &r.backend);
        Route {
            host,
            sni,
            path_prefix: r.path_prefix.clone(),
            backend,
        }
    }

    fn header_rules(&mut self, path: &[Step], rules: &[RawHeaderRule]) -> Vec<HeaderRule> {
        let mut out = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let path = with(path, Step::Index(i));
            let chosen = [&r.set, &r.add, &r.remove].iter().filter(|k| k.is_some()).count();
            if chosen != 1 {
                self.error(&path, "a header rule is exactly one of `set`, `add` or `remove`");
                continue;
            }
            let rule = match (&r.set, &r.add, &r.remove, &r.value) {
                (Some(n), _, _, Some(v)) => HeaderRule::Set(n.clone(), v.clone()),
                (_, Some(n), _, Some(v)) => HeaderRule::Add(n.clone(), v.clone()),
                (_, _, Some(n), None) => HeaderRule::Remove(n.clone()),
                (_, _, Some(_), Some(_)) => {
                    self.error(&with(&path, Step::Key("value")), "a `remove` rule takes no value");
                    continue;
                }
                _ => {
                    self.error(&path, "a `set` or `add` rule needs a `value`");
                    continue;
                }
            };
            let (HeaderRule::Set(name, _) | HeaderRule::Add(name, _) | HeaderRule::Remove(name)) = &rule;
            if name.is_empty() || !name.bytes().all(is_tchar) {
                self.error(&path, format!("`{name}` is not a header name"));
            } else if CONNECTION_FIELDS.iter().any(|f| name.eq_ignore_ascii_case(f)) {
                // The analyzers checked the message with its framing; lb writes these itself.
                self.error(
                    &path,
                    format!("`{name}` frames the message or manages the connection: rules cannot change it"),
                );
            }
            if let HeaderRule::Set(_, v) | HeaderRule::Add(_, v) = &rule {
                if v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                    self.error(
                        &with(&path, Step::Key("value")),
                        "a header value cannot hold control characters or line breaks",
                    );
                }
            }
            out.push(rule);
        }
        out
    }
}

fn forwarded(raw: Option<&RawForwarded>) -> Forwarded {
    Forwarded {
        x_forwarded_for: raw.and_then(|f| f.x_forwarded_for).unwrap_or(true),
        x_forwarded_proto: raw.and_then(|f| f.x_forwarded_proto).unwrap_or(true),
        forwarded: raw.and_then(|f| f.forwarded).unwrap_or(false),
    }
}

#[cfg(test)]
mod tests;
