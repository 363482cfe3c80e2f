use super::*;
use crate::config::{Forwarded, HeaderRule, Http};
use crate::http::request::{self, Limits};
use std::time::Duration;

fn http(forwarded: Forwarded, request_rules: Vec<HeaderRule>) -> Http {
    Http {
        routes: vec![],
        forwarded,
        request_rules,
        response_rules: vec![HeaderRule::Remove("Server".into())],
        request_timeout: Duration::from_secs(1),
        keep_alive_timeout: Duration::from_secs(1),
        tunnel_timeout: Duration::from_secs(1),
        access_log: crate::http::log::Format::Text,
        https: false,
    }
}

const NONE: Forwarded = Forwarded {
    x_forwarded_for: false,
    x_forwarded_proto: false,
    forwarded: false,
};

const ALL: Forwarded = Forwarded {
    x_forwarded_for: true,
    x_forwarded_proto: true,
    forwarded: true,
};

fn req(head: &str) -> Request {
    let limits = Limits {
        max_header_bytes: 4096,
        max_body_bytes: None,
        max_header_fields: crate::http::request::DEFAULT_MAX_HEADERS,
    };
    request::analyze(head.as_bytes(), &limits).unwrap().unwrap()
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

#[test]
fn hop_by_hop_fields_are_dropped_and_forwarding_fields_added() {
    let r = req("GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\nX-Secret: s\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nForwarded: for=10.0.0.1\r\nAccept: */*\r\n\r\n");
    let head = text(request_head(&r, &http(ALL, vec![]), "192.0.2.7", false, false));
    assert_eq!(
        head,
        "GET /x HTTP/1.1\r\nHost: a\r\nForwarded: for=10.0.0.1, for=192.0.2.7;proto=http\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.1, 192.0.2.7\r\nX-Forwarded-Proto: http\r\n\r\n"
    );
}

#[test]
fn a_tls_listener_tells_https_whatever_the_client_claimed() {
    let r = req("GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: http\r\n\r\n");
    let https = Http {
        https: true,
        ..http(ALL, vec![])
    };
    let head = text(request_head(&r, &https, "192.0.2.7", false, false));
    assert_eq!(
        head,
        "GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: https\r\nForwarded: for=192.0.2.7;proto=https\r\n\r\n"
    );
}

#[test]
fn an_upgrade_keeps_its_fields() {
    let r = req("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n");
    assert!(is_upgrade(&r));
    let head = text(request_head(&r, &http(NONE, vec![]), "::1", false, true));
    assert_eq!(head, "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nConnection: upgrade\r\n\r\n");
}

#[test]
fn rules_apply_in_order_after_the_forwarding_fields() {
    let r = req("POST / HTTP/1.0\r\nX-Env: dev\r\nX-Env: test\r\nCookie: c\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n");
    let rules = vec![
        HeaderRule::Set("x-env".into(), "prod".into()),
        HeaderRule::Add("Via".into(), "1.0 lb".into()),
        HeaderRule::Remove("cookie".into()),
        HeaderRule::Remove("X-Forwarded-Proto".into()),
    ];
    let only_xff = Forwarded {
        x_forwarded_for: true,
        x_forwarded_proto: true,
        forwarded: false,
    };
    let head = text(request_head(
        &r,
        &http(only_xff, rules),
        "2001:db8::1",
        false,
        false,
    ));
    assert_eq!(
        head,
        "POST / HTTP/1.0\r\nContent-Length: 0\r\nX-Forwarded-For: 2001:db8::1\r\nx-env: prod\r\nVia: 1.0 lb\r\n\r\n"
    );
    assert!(!client_keeps_alive(&r));
}

#[test]
fn response_heads() {
    let resp = |head: &str| {
        crate::http::response::analyze(
            head.as_bytes(),
            "GET",
            4096,
            crate::http::request::DEFAULT_MAX_HEADERS,
        )
        .unwrap()
        .unwrap()
    };
    let h = http(ALL, vec![]);
    let ok = resp("HTTP/1.0 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n");
    assert!(!server_keeps_alive(&ok));
    assert_eq!(
        text(response_head(&ok, &h, true)),
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    );
    let switching =
        resp("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
    assert_eq!(
        text(response_head(&switching, &h, false)),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    );
    // A 204 has no body and says nothing of one; a 304 tells the size of the body not sent.
    let no_content = resp("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX: y\r\n\r\n");
    assert_eq!(
        text(response_head(&no_content, &h, false)),
        "HTTP/1.1 204 No Content\r\nX: y\r\n\r\n"
    );
    let not_modified = resp("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n");
    assert_eq!(
        text(response_head(&not_modified, &h, false)),
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"
    );
}

#[test]
fn connection_cannot_drop_framing_or_host() {
    // Dropping Content-Length here would turn the body into a request the server reads unseen.
    let r = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nConnection: Content-Length, Host, Transfer-Encoding, X-Gone\r\nX-Gone: 1\r\n\r\n");
    let head = text(request_head(&r, &http(NONE, vec![]), "192.0.2.1", false, false));
    assert_eq!(head, "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
}

#[test]
fn an_h2c_upgrade_is_not_tunneled() {
    let r = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n");
    assert!(!is_upgrade(&r));
    let head = text(request_head(&r, &http(NONE, vec![]), "192.0.2.1", false, false));
    assert_eq!(head, "GET / HTTP/1.1\r\nHost: a\r\n\r\n");
}

#[test]
fn a_client_that_closes_has_the_server_asked_to_close_too() {
    let h = http(NONE, vec![]);
    let r = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let head = text(request_head(&r, &h, "127.0.0.1", false, false));
    assert_eq!(head, "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    // Kept alive: no Connection field (keep-alive is HTTP/1.1's default).
    let r = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n");
    let head = text(request_head(&r, &h, "127.0.0.1", false, false));
    assert_eq!(head, "GET / HTTP/1.1\r\nHost: a\r\n\r\n");
}

#[test]
fn expect_goes_on_from_an_http11_client_only() {
    let h = http(NONE, vec![]);
    let r = req("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    let head = text(request_head(&r, &h, "192.0.2.1", false, false));
    assert!(head.contains("Expect: 100-continue\r\n"), "{head}");
    let r = req("PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    let head = text(request_head(&r, &h, "192.0.2.1", false, false));
    assert!(!head.contains("Expect"), "{head}");
}
