//! The request analyzer against well-formed, incomplete, oversized, malformed and smuggling
//! heads.
use super::*;

const LIMITS: Limits = Limits {
    max_header_bytes: 1024,
    max_body_bytes: Some(1 << 20),
    max_header_fields: DEFAULT_MAX_HEADERS,
};

fn status(head: &[u8]) -> Result<Option<()>, u16> {
    analyze(head, &LIMITS)
        .map(|r| r.map(|_| ()))
        .map_err(|r| r.status)
}

#[test]
fn a_simple_get() {
    let buf = b"GET /a?b=c HTTP/1.1\r\nHost: Example.COM:8080\r\nAccept: */*\r\n\r\nNEXT";
    let r = analyze(buf, &LIMITS).unwrap().unwrap();
    assert_eq!(
        (r.method.as_str(), r.target.as_str(), r.version),
        ("GET", "/a?b=c", Version::Http11)
    );
    assert_eq!(r.head_len, buf.len() - 4);
    assert_eq!(r.host.as_deref(), Some("example.com"));
    assert_eq!(r.body, Body::None);
    assert_eq!(r.headers.len(), 2);
}

#[test]
fn framing_and_host_come_from_the_head() {
    let r = analyze(
        b"POST http://Api.Example:81/x HTTP/1.1\r\nHost: other\r\nContent-Length: 5\r\n\r\n",
        &LIMITS,
    )
    .unwrap()
    .unwrap();
    // The authority of an absolute-form target wins over Host (RFC 9112 §3.2.2).
    assert_eq!(r.host.as_deref(), Some("api.example"));
    assert_eq!(r.body, Body::Length(5));
    let r = analyze(
        b"PUT /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        &LIMITS,
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.body, Body::Chunked);
    let r = analyze(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n", &LIMITS)
        .unwrap()
        .unwrap();
    assert_eq!(r.host.as_deref(), Some("[::1]"));
    let r = analyze(b"GET / HTTP/1.0\r\n\r\n", &LIMITS).unwrap().unwrap();
    assert_eq!((r.version, r.host), (Version::Http10, None));
}

#[test]
fn an_incomplete_head_is_not_an_error() {
    let full = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    for end in 0..full.len() {
        assert_eq!(
            status(&full[..end]),
            Ok(None),
            "{:?}",
            String::from_utf8_lossy(&full[..end])
        );
    }
    assert_eq!(status(full), Ok(Some(())));
}

#[test]
fn oversized_heads() {
    let long_target = format!("GET /{} HTTP/1.1\r\n", "a".repeat(2000));
    assert_eq!(status(long_target.as_bytes()), Err(414));
    assert_eq!(status(&long_target.as_bytes()[..1100]), Err(414));
    let long_headers = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n", "b".repeat(2000));
    assert_eq!(status(long_headers.as_bytes()), Err(431));
    let complete_but_long = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "b".repeat(1000));
    assert_eq!(status(complete_but_long.as_bytes()), Err(431));
    let many = format!(
        "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
        "X: y\r\n".repeat(DEFAULT_MAX_HEADERS)
    );
    let limits = Limits {
        max_header_bytes: 64 * 1024,
        ..LIMITS
    };
    assert_eq!(
        analyze(many.as_bytes(), &limits)
            .map(|_| ())
            .map_err(|r| r.status),
        Err(431)
    );
    // One field more is allowed: the same head passes, and one more field than that does not.
    let more = Limits {
        max_header_fields: DEFAULT_MAX_HEADERS + 1,
        ..limits
    };
    assert!(matches!(analyze(many.as_bytes(), &more), Ok(Some(_))));
    let too_many = many.replacen("X: y", "X: y\r\nZ: z", 1);
    assert_eq!(
        analyze(too_many.as_bytes(), &more)
            .map(|_| ())
            .map_err(|r| r.status),
        Err(431)
    );
}

/// A few refusals, one per class; the whole table (over 40 heads, each checked end to end with
/// a backend that must receive nothing) is tests/tests/http_mode.rs.
#[test]
fn refusals_by_class() {
    for (head, expected) in [
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n",
            413,
        ),
        ("GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        ("CONNECT a: HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ] {
        assert_eq!(status(head.as_bytes()), Err(expected), "{head:?}");
    }
}

#[test]
fn lookalikes_of_refused_heads_are_accepted() {
    for head in [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "GET HTTP://a.example/x?y HTTP/1.1\r\nHost: a.example\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nX: caf\u{e9} \t tab\r\n\r\n",
        "\r\nGET / HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n\r\n",
        "get / HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        assert_eq!(status(head.as_bytes()), Ok(Some(())), "{head:?}");
    }
}

#[test]
fn routing_paths_are_normalized() {
    let path = |target: &str| {
        let head = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
        analyze(head.as_bytes(), &LIMITS).unwrap().unwrap().path
    };
    assert_eq!(path("/a/b?q=/x"), "/a/b");
    assert_eq!(path("/pub/../internal"), "/internal");
    assert_eq!(path("/%69nternal/%2Fx"), "/internal/%2Fx");
    assert_eq!(path("/a/./b/."), "/a/b/");
    assert_eq!(path("/.."), "/");
    assert_eq!(path("/internal/x?u=://h/pub"), "/internal/x");
    assert_eq!(path("http://h.example"), "/");
    assert_eq!(path("http://h.example?x=/pub"), "/");
    assert_eq!(path("HTTP://h.example/p/../q"), "/q");
    let r = analyze(
        b"GET http://Real.example:81/x HTTP/1.1\r\nHost: fake\r\n\r\n",
        &LIMITS,
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.target_authority.as_deref(), Some("Real.example:81"));
}
