//! The request analyzer against well-formed, incomplete, oversized, malformed and smuggling
//! heads.
use super::*;

const LIMITS: Limits = Limits {
    max_header_bytes: 1024,
    max_body_bytes: Some(1 << 20),
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
        "X: y\r\n".repeat(MAX_HEADERS)
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
}

/// Each refused head, its status, and the class of attack it stands for. Every one must be
/// refused whole: the analyzer is what keeps it from the server.
const REFUSED: &[(&str, u16, &str)] = &[
    // Framing (request smuggling proper).
    (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "CL.TE",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        400,
        "TE.CL",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        400,
        "CL.CL differing",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
        400,
        "CL list differing",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        400,
        "negative CL",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n",
        400,
        "hex CL",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n",
        400,
        "CL with inner space",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n",
        400,
        "CL overflow",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n",
        413,
        "CL above max_body_bytes",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        400,
        "TE chunked not final",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
        "TE without chunked",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "TE chunked twice",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
        400,
        "TE lookalike",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n",
        400,
        "TE quoted",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;x=1\r\n\r\n",
        400,
        "TE with parameter",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n",
        400,
        "TE empty",
    ),
    (
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "TE in HTTP/1.0",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        400,
        "space before colon",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\t: chunked\r\n\r\n",
        400,
        "tab before colon",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n",
        400,
        "obs-fold",
    ),
    (
        "POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n\tz\r\n\r\n",
        400,
        "obs-fold with tab",
    ),
    (" POST / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "leading space"),
    // Line endings.
    (
        "GET / HTTP/1.1\nHost: a\r\n\r\n",
        400,
        "bare LF after the request line",
    ),
    ("GET / HTTP/1.1\r\nHost: a\n\r\n", 400, "bare LF after a field"),
    ("GET / HTTP/1.1\r\nHost: a\r\n\n", 400, "bare LF ending the head"),
    ("GET / HTTP/1.1\rHost: a\r\n\r\n", 400, "bare CR"),
    (
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        400,
        "bare CR in a value",
    ),
    // Names and values.
    (
        "GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
        400,
        "space in a name",
    ),
    (
        "GET / HTTP/1.1\r\nHost: a\r\nBad\x01Name: x\r\n\r\n",
        400,
        "control in a name",
    ),
    ("GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n", 400, "empty name"),
    (
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        400,
        "NUL in a value",
    ),
    (
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
        400,
        "DEL in a value",
    ),
    (
        "GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
        400,
        "field without colon",
    ),
    // Host.
    ("GET / HTTP/1.1\r\n\r\n", 400, "no Host in 1.1"),
    ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "two Hosts"),
    ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "space in Host"),
    ("GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", 400, "userinfo in Host"),
    ("GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400, "bad port in Host"),
    ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "slash in Host"),
    // Method, target, version.
    ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "method not a token"),
    (
        "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "two spaces in the request line",
    ),
    ("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "space in the target"),
    ("GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400, "DEL in the target"),
    ("GET /\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n", 400, "non-ASCII target"),
    ("GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400, "fragment"),
    ("GET a HTTP/1.1\r\nHost: a\r\n\r\n", 400, "relative target"),
    ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "* without OPTIONS"),
    ("CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "CONNECT to a path"),
    (
        "CONNECT a HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "CONNECT without port",
    ),
    ("GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "other scheme"),
    (
        "GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "empty authority",
    ),
    ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505, "HTTP/1.2"),
    ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "HTTP/2.0"),
    ("GET / HTTP/2\r\nHost: a\r\n\r\n", 505, "HTTP/2"),
    ("GET / HTTP/1.x\r\nHost: a\r\n\r\n", 400, "malformed version"),
    ("GET / http/1.1\r\nHost: a\r\n\r\n", 400, "lowercase version"),
    ("GET /\r\nHost: a\r\n\r\n", 400, "HTTP/0.9 request line"),
];

#[test]
fn malformed_and_smuggling_heads_are_refused() {
    assert!(REFUSED.len() >= 40);
    let mut wrong = Vec::new();
    for &(head, expected, class) in REFUSED {
        let got = status(head.as_bytes());
        if got != Err(expected) {
            wrong.push(format!("{class}: expected {expected}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
