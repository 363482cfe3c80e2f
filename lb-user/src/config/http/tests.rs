use super::super::{parse, ConfigErrors};
use super::*;

const BACKENDS: &str = "backends:\n  - name: app\n    servers: [{ name: s1, address: 127.0.0.1:9001 }]\n  - name: api\n    servers: [{ name: s1, address: 127.0.0.1:9002 }]\n";

fn http(listener: &str) -> Result<super::super::Config, ConfigErrors> {
    parse(
        "t.yaml",
        &format!("listeners:\n  - name: web\n    bind: 127.0.0.1:8080\n    mode: http\n{listener}{BACKENDS}"),
    )
}

fn first_error(r: Result<super::super::Config, ConfigErrors>) -> String {
    r.unwrap_err().0[0].to_string()
}

#[test]
fn defaults_of_an_http_listener() {
    let c = http("    default_backend: app\n").unwrap();
    let h = c.listeners[0].http.as_ref().unwrap();
    assert_eq!(h.request_timeout, DEFAULT_HTTP_REQUEST);
    assert_eq!(h.keep_alive_timeout, DEFAULT_HTTP_REQUEST);
    assert_eq!(h.tunnel_timeout, DEFAULT_TUNNEL);
    assert_eq!(
        h.forwarded,
        Forwarded {
            x_forwarded_for: true,
            x_forwarded_proto: true,
            forwarded: false
        }
    );
    assert_eq!(c.limits.max_header_bytes, 16 << 10);
    assert_eq!(c.limits.max_body_bytes, None);
}

#[test]
fn routes_rules_and_timeouts() {
    let c = http(concat!(
        "    backend: app\n",
        "    timeouts: { http_request: 2s, http_keep_alive: 30s }\n",
        "    routes:\n",
        "      - { host: '*.Example.com', backend: api }\n",
        "      - { host: www.example.com, path_prefix: /static/, backend: app }\n",
        "      - { path_prefix: /api/, backend: api }\n",
        "    forwarded: { x_forwarded_proto: false, forwarded: true }\n",
        "    access_log: json\n",
        "    request_headers:\n",
        "      - { set: X-Env, value: prod }\n",
        "      - { remove: Cookie }\n",
        "    response_headers:\n",
        "      - { add: Via, value: 1.1 lb }\n",
    ))
    .unwrap();
    let h = c.listeners[0].http.as_ref().unwrap();
    assert_eq!(
        (h.request_timeout, h.keep_alive_timeout),
        (Duration::from_secs(2), Duration::from_secs(30))
    );
    assert_eq!(h.routes[0].host, Some(HostMatch::Suffix(".example.com".into())));
    assert_eq!(h.routes[0].backend, 1);
    assert!(h.routes[0].matches(Some("a.example.com"), None, "/"));
    assert!(!h.routes[0].matches(Some("example.com"), None, "/"));
    assert!(!h.routes[0].matches(None, None, "/"));
    assert!(h.routes[1].matches(Some("www.example.com"), None, "/static/x.css"));
    assert!(!h.routes[1].matches(Some("www.example.com"), None, "/Static/x.css"));
    assert!(h.routes[2].matches(None, None, "/api/v1"));
    assert!(!h.routes[2].matches(None, None, "/"));
    assert!(!h.forwarded.x_forwarded_proto && h.forwarded.forwarded);
    assert_eq!(h.access_log, crate::http::log::Format::Json);
    assert_eq!(
        h.request_rules,
        vec![
            HeaderRule::Set("X-Env".into(), "prod".into()),
            HeaderRule::Remove("Cookie".into())
        ]
    );
    assert_eq!(
        h.response_rules,
        vec![HeaderRule::Add("Via".into(), "1.1 lb".into())]
    );
}

#[test]
fn mistakes_are_reported_where_they_are() {
    let cases = [
        (
            "    backend: app\n    routes:\n      - { backend: api }\n",
            "t.yaml:7:9: a route needs",
        ),
        (
            "    backend: app\n    routes:\n      - { host: 'a b', backend: api }\n",
            "t.yaml:7:17: host: `a b`",
        ),
        (
            "    backend: app\n    routes:\n      - { host: 'foo*', backend: api }\n",
            "t.yaml:7:17: host: `foo*`",
        ),
        (
            "    backend: app\n    routes:\n      - { path_prefix: api, backend: api }\n",
            "t.yaml:7:24: path_prefix: `api`",
        ),
        (
            "    backend: app\n    routes:\n      - { host: a, backend: nope }\n",
            "t.yaml:7:29: route names backend `nope`",
        ),
        (
            "    backend: app\n    request_headers:\n      - { set: X-A }\n",
            "t.yaml:7:9: a `set` or `add` rule needs a `value`",
        ),
        (
            "    backend: app\n    request_headers:\n      - { set: X-A, remove: X-B }\n",
            "t.yaml:7:9: a header rule is exactly one",
        ),
        (
            "    backend: app\n    request_headers:\n      - { remove: X-B, value: x }\n",
            "t.yaml:7:31: a `remove` rule takes no value",
        ),
        (
            "    backend: app\n    request_headers:\n      - { add: 'X A', value: x }\n",
            "t.yaml:7:9: `X A` is not a header name",
        ),
        (
            "    backend: app\n    request_headers:\n      - { add: X-A, value: \"a\\nb\" }\n",
            "t.yaml:7:28: a header value cannot hold",
        ),
        (
            "    backend: app\n    timeouts: { tunnel: 0s }\n",
            "t.yaml:6:25: timeouts.tunnel must be longer than zero",
        ),
        (
            "    backend: app\n    access_log: xml\n",
            "t.yaml:6:17: access_log: `xml` is not a format",
        ),
        (
            "    backend: app\n    request_headers:\n      - { remove: Content-Length }\n",
            "t.yaml:7:9: `Content-Length` frames the message",
        ),
    ];
    for (listener, expected) in cases {
        let got = first_error(http(listener));
        assert!(got.starts_with(expected), "expected {expected:?}, got {got:?}");
    }
}

#[test]
fn http_keys_belong_to_http_listeners() {
    let e = first_error(parse(
        "t.yaml",
        &format!("listeners:\n  - name: raw\n    bind: 127.0.0.1:8080\n    backend: app\n    routes:\n      - {{ path_prefix: /, backend: api }}\n{BACKENDS}"),
    ));
    assert!(
        e.starts_with("t.yaml:6:7: routes: only for `mode: http` listeners"),
        "{e}"
    );
    let e = first_error(parse(
        "t.yaml",
        &format!("limits: {{ max_header_bytes: 10 }}\nlisteners:\n  - name: raw\n    bind: 127.0.0.1:8080\n    backend: app\n{BACKENDS}"),
    ));
    assert!(
        e.starts_with("t.yaml:1:29: limits.max_header_bytes must be between"),
        "{e}"
    );
    let e = first_error(parse(
        "t.yaml",
        &format!("listeners:\n  - name: raw\n    bind: 127.0.0.1:8080\n    backend: app\n{BACKENDS}    timeouts: {{ http_request: 1s }}\n"),
    ));
    assert!(e.contains("a backend's timeouts may only set"), "{e}");
}
