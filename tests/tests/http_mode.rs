//! HTTP mode end to end: real clients (curl, Python's http.client, raw sockets) through the real
//! lb binary to a reflecting backend.
use futures_util::{SinkExt, StreamExt};
use lb_tests::{
    bpf_available,
    http::{raw_exchange, run_tool, status_of, HttpLbBuilder, Reflector},
};
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Runs each named test over plain HTTP and over HTTPS (a listener with `tls:`: the same
/// analyzers, routing, rewriting and keep-alive behind a TLS handshake), as `NAME::plain` and
/// `NAME::https`.
macro_rules! plain_and_https {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn plain() {
                super::$name(false).await
            }
            #[tokio::test]
            async fn https() {
                super::$name(true).await
            }
        }
    )*};
}

plain_and_https!(
    malformed_and_smuggling_requests_never_reach_the_backend,
    curl_requests_on_one_connection_follow_their_routes,
    python_http_client_keeps_its_connection_and_so_does_lb,
    the_backend_sees_the_rewritten_head,
    slowloris_gets_408_at_the_timeout_while_others_are_served,
    wrk_with_keep_alive_gets_only_correct_answers,
    a_connection_field_cannot_unframe_a_body,
    expect_100_continue_is_answered_by_the_server,
    a_malformed_chunked_body_is_refused,
    a_kept_connection_the_server_closed_is_replaced,
);

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

async fn malformed_and_smuggling_requests_never_reach_the_backend(tls: bool) {
    assert!(REFUSED.len() >= 40);
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .top_yaml("limits: { max_body_bytes: 1MiB }\n")
        .tls(tls)
        .spawn();
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(20_000));
    let long_head = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "b".repeat(20_000));
    let oversized = [
        (long_target.as_str(), 414, "request line above the limit"),
        (long_head.as_str(), 431, "head above the limit"),
    ];
    let mut wrong = Vec::new();
    for &(head, expected, class) in REFUSED.iter().chain(oversized.iter()) {
        let answer = lb.exchange(head.as_bytes()).await;
        if status_of(&answer) != Some(expected) {
            wrong.push(format!(
                "{class}: expected {expected}, got {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(40)])
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(app.connections(), 0, "a refused request reached the backend");
    // The same listener still serves well-formed requests.
    let ok = lb
        .exchange(b"GET /fine HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status_of(&ok), Some(200), "{}", String::from_utf8_lossy(&ok));
    // lb's own answers are counted by class.
    let m = lb.metrics();
    let class = |code: &str| {
        m.get(&format!(
            "lb_http_responses_total{{listener=\"web\",code=\"{code}\"}}"
        ))
    };
    let fives = REFUSED.iter().filter(|(_, status, _)| *status >= 500).count() as f64;
    assert_eq!(class("5xx"), fives, "{}", m.text);
    assert_eq!(
        class("4xx"),
        (REFUSED.len() + oversized.len()) as f64 - fives,
        "{}",
        m.text
    );
    assert_eq!(class("2xx"), 1.0, "{}", m.text);
}

async fn curl_requests_on_one_connection_follow_their_routes(tls: bool) {
    let (app, api) = (Reflector::start("app").await, Reflector::start("api").await);
    let lb = HttpLbBuilder::new(&[app.addr])
        .backend("api", &[api.addr])
        .listener_yaml("    routes:\n      - { path_prefix: /api/, backend: api }\n")
        .tls(tls)
        .spawn();
    let ((a, tls_args), (b, _), (c, _)) = (lb.url("/a"), lb.url("/api/v1"), lb.url("/api/upload"));
    let w = "\n[connects=%{num_connects} status=%{http_code}]\n";
    // Each request its own options (--next resets them), the TLS ones too.
    let mut args: Vec<String> = Vec::new();
    let requests: [&[&str]; 3] = [
        &[&a],
        &["-d", "x=1", &b],
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "chunked upload",
            &c,
        ],
    ];
    for (i, request) in requests.iter().enumerate() {
        if i > 0 {
            args.push("--next".into());
        }
        args.extend(["-sS", "-w", w].map(String::from));
        args.extend(tls_args.iter().cloned());
        args.extend(request.iter().map(|a| a.to_string()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool("curl", &args).await;
    assert!(out.contains("app GET /a\n"), "{out}");
    assert!(
        out.contains("api POST /api/v1\n") && out.contains("body=x=1"),
        "{out}"
    );
    assert!(
        out.contains("api POST /api/upload\n") && out.contains("body=chunked upload"),
        "{out}"
    );
    // One client connection for the three requests.
    assert_eq!(out.matches("[connects=1 status=200]").count(), 1, "{out}");
    assert_eq!(out.matches("[connects=0 status=200]").count(), 2, "{out}");
}

async fn python_http_client_keeps_its_connection_and_so_does_lb(tls: bool) {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr]).tls(tls).spawn();
    let connection = match &lb.tls {
        None => format!("http.client.HTTPConnection(\"{}\", {}, timeout=10)", lb.listener.ip(), lb.listener.port()),
        // The certificate names 127.0.0.1 too: Python checks it against the address.
        Some(t) => format!(
            "http.client.HTTPSConnection(\"{}\", {}, timeout=10, context=ssl.create_default_context(cafile=\"{}\"))",
            lb.listener.ip(),
            lb.listener.port(),
            t.ca.display()
        ),
    };
    let script = format!(
        r#"
import http.client, ssl
c = {connection}
socks = set()
for i in range(5):
    c.request("POST" if i % 2 else "GET", f"/r{{i}}", body=b"p" * i if i % 2 else None)
    r = c.getresponse()
    body = r.read().decode()
    assert r.status == 200, r.status
    assert body.startswith(f"app {{'POST' if i % 2 else 'GET'}} /r{{i}}"), body
    socks.add(id(c.sock))
c.request("POST", "/empty", body=b"")
r = c.getresponse()
assert r.status == 200 and "content-length: 0" in r.read().decode().lower()
socks.add(id(c.sock))
print("ok", len(socks))
"#
    );
    let out = run_tool("python3", &["-c", &script]).await;
    assert_eq!(out.trim(), "ok 1");
    assert_eq!(app.connections(), 1, "lb opened more than one server connection");
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), 6);
}

async fn the_backend_sees_the_rewritten_head(tls: bool) {
    let (app, api) = (Reflector::start("app").await, Reflector::start("api").await);
    let lb = HttpLbBuilder::new(&[app.addr])
        .backend("api", &[api.addr])
        .listener_yaml(concat!(
            "    routes:\n",
            "      - { host: '*.api.test', backend: api }\n",
            "    forwarded: { forwarded: true }\n",
            "    request_headers:\n",
            "      - { set: X-Env, value: test }\n",
            "      - { add: X-Added, value: one }\n",
            "      - { remove: Cookie }\n",
            "    response_headers:\n",
            "      - { remove: Date }\n",
            "      - { add: Via, value: 1.1 lb }\n",
        ))
        .tls(tls)
        .spawn();
    let request = concat!(
        "GET /h HTTP/1.1\r\nHost: V1.Api.Test:8080\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n",
        "Keep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\nX-Env: dev\r\nCookie: c=1\r\n\r\n",
    );
    let mut s = lb.connect().await;
    s.write_all(request.as_bytes()).await.unwrap();
    s.write_all(b"GET /close HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("lb closed after the second response")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    let (first, second) = text
        .split_once("api GET /h\n")
        .map(|(_, rest)| rest.split_once("HTTP/1.1 ").unwrap())
        .unwrap();
    let scheme = if tls { "https" } else { "http" };
    for seen in [
        "x-forwarded-for: 10.0.0.1, 127.0.0.1\n".to_string(),
        format!("x-forwarded-proto: {scheme}\n"),
        format!("forwarded: for=127.0.0.1;proto={scheme}\n"),
        "x-env: test\n".into(),
        "x-added: one\n".into(),
    ] {
        assert!(first.contains(&seen), "missing {seen:?} in\n{first}");
    }
    for gone in ["x-secret", "keep-alive", "te:", "cookie", "connection"] {
        assert!(!first.contains(gone), "{gone:?} reached the backend:\n{first}");
    }
    // Pipelined: the second request was answered after the first, by the default backend,
    // which was asked to close too (lb closes after it).
    assert!(second.contains("app GET /close\n"), "{second}");
    assert!(second.contains("connection: close\n"), "{second}");
    assert!(
        text.contains("Via: 1.1 lb\r\n") && !text.to_ascii_lowercase().contains("date:"),
        "{text}"
    );
    assert!(
        second.starts_with("200 OK\r\n") && second.contains("Connection: close\r\n"),
        "{second}"
    );
}

async fn slowloris_gets_408_at_the_timeout_while_others_are_served(tls: bool) {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .listener_yaml("    timeouts: { http_request: 2s }\n")
        .tls(tls)
        .spawn();
    let dial = lb.dialer();
    let slow_dial = dial.clone();
    let slow = tokio::spawn(async move {
        // From before the connect: lb's clock starts when it accepts, which can come before this
        // task runs again after the connect (by 100 ms in the kTLS VM, under emulation).
        let started = Instant::now();
        let mut s = slow_dial.connect().await;
        let head = b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Dribble: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        // One byte a second, until lb answers (bounded by the head's length).
        for b in head {
            if s.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
            let mut buf = [0u8; 256];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                return (status_of(&buf[..n]), started.elapsed());
            }
        }
        (None, started.elapsed())
    });
    let mut others = Vec::new();
    for i in 0..50 {
        let dial = dial.clone();
        others.push(tokio::spawn(async move {
            let req = format!("GET /fast{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            status_of(&dial.exchange(req.as_bytes()).await)
        }));
    }
    for o in others {
        assert_eq!(o.await.unwrap(), Some(200));
    }
    let (status, after) = slow.await.unwrap();
    assert_eq!(
        status,
        Some(408),
        "the slow client was not refused (after {after:?})"
    );
    assert!(
        after >= Duration::from_millis(1900),
        "408 came before the timeout: {after:?}"
    );
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), 50);
}

async fn wrk_with_keep_alive_gets_only_correct_answers(tls: bool) {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr]).tls(tls).spawn();
    // Every response is checked (status and the backend's description of the request); wrk
    // keeps its 8 connections alive for the whole 4 s. (In the kTLS VM, under software
    // emulation, the 8 TLS handshakes alone took up to 2 s, and a 2 s run got no answer.)
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        script.path(),
        r#"
-- wrk runs response() in each thread's own Lua state: the counts are gathered from the threads.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= 200 or not body:find("^app GET /wrk\n") then bad = bad + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("bad") end
  io.write(string.format("requests=%d bad=%d errors=%d\n", summary.requests, total,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
"#,
    )
    .unwrap();
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{}/wrk", lb.listener);
    let out = run_tool(
        "wrk",
        &[
            "-t",
            "2",
            "-c",
            "8",
            "-d",
            "4s",
            "-s",
            script.path().to_str().unwrap(),
            &url,
        ],
    )
    .await;
    let line = out
        .lines()
        .find(|l| l.starts_with("requests="))
        .unwrap_or_else(|| panic!("{out}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap()
    };
    // More requests than connections: connections were reused (how many more is a matter of
    // speed, for the benchmarks).
    assert!(field("requests") > 8, "{out}");
    eprintln!(
        "wrk through lb: {line}, {} server connection(s)",
        app.connections()
    );
    assert_eq!((field("bad"), field("errors")), (0, 0), "{out}");
    // Keep-alive on both sides: a handful of connections carried every request.
    assert!(
        app.connections() <= 8,
        "{} server connections for {} requests",
        app.connections(),
        field("requests")
    );
}

#[tokio::test]
async fn a_websocket_goes_through_as_a_kernel_forwarded_tunnel() {
    if !bpf_available("a_websocket_goes_through_as_a_kernel_forwarded_tunnel") {
        return;
    }
    let (app, chat) = (
        Reflector::start("app").await,
        lb_tests::servers::websocket_echo().await,
    );
    let lb = HttpLbBuilder::new(&[app.addr])
        .backend("chat", &[chat])
        .listener_yaml("    routes:\n      - { path_prefix: /chat, backend: chat }\n")
        .spawn();
    let stream = tokio::net::TcpStream::connect(lb.listener).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("ws://{}/chat", lb.listener), stream)
        .await
        .expect("the WebSocket upgrade through lb failed");
    assert_eq!(response.status(), 101);
    lb.wait_for("the tunnel in the kernel", |m| m.get("lb_kernel_flows") == 1.0)
        .await;
    let mut rng = SmallRng::seed_from_u64(5);
    let mut total = 0;
    for size in [1usize, 125, 4096, 70_000, 1 << 20] {
        let mut payload = vec![0u8; size];
        rng.fill_bytes(&mut payload);
        ws.send(Message::binary(payload.clone())).await.unwrap();
        let text = format!("text message of {size} bytes");
        ws.send(Message::text(text.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            back.into_data() == payload,
            "a {size}-byte message came back altered"
        );
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
        total += size + text.len();
    }
    ws.close(None).await.unwrap();
    drop(ws);
    // The closing record of the tunnel counts what the kernel forwarded.
    lb.wait_for_log("tunnel closed").await;
    let log = lb.log();
    let closing = log.lines().find(|l| l.contains("tunnel closed")).unwrap();
    let kernel: u64 = closing
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kernel=")?.parse().ok())
        .unwrap_or_else(|| panic!("no kernel= in {closing}"));
    assert!(kernel >= 2 * total as u64, "{closing}");
    let m = lb.metrics();
    // Every byte crossed lb twice (to the echo and back), in the kernel; frames add a little.
    assert!(
        m.kernel_bytes() >= 2.0 * total as f64 && m.user_bytes() == 0.0,
        "the tunnel's bytes were not forwarded by the kernel:\n{}",
        m.text
    );
    assert!(
        lb.log().contains("\"GET 127.0.0.1 /chat\" 101"),
        "no access log line for the upgrade:\n{}",
        lb.log()
    );
}

#[tokio::test]
async fn the_access_log_can_be_json() {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .listener_yaml("    access_log: json\n")
        .spawn();
    let answer = raw_exchange(
        lb.listener,
        b"POST /j?x=1 HTTP/1.1\r\nHost: J.example\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert_eq!(status_of(&answer), Some(200));
    lb.wait_for_log("\"target\":\"/j?x=1\"").await;
    let log = lb.log();
    let line = log.lines().find(|l| l.contains("\"target\":\"/j?x=1\"")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    assert_eq!(record["method"], "POST");
    assert_eq!(record["host"], "j.example");
    assert_eq!(record["status"], 200);
    assert_eq!(record["backend"], "app");
    assert_eq!(record["server"], "s0");
    assert_eq!(record["kernel_bytes"], 0);
    assert!(
        record["bytes_in"].as_u64().unwrap() > 3 && record["bytes_out"].as_u64() == Some(answer.len() as u64),
        "{record}"
    );
    assert!(record["time"].as_str().unwrap().ends_with('Z'), "{record}");
}

async fn a_connection_field_cannot_unframe_a_body(tls: bool) {
    // Were Content-Length dropped as hop-by-hop, the server would read the body as a second
    // request lb never analyzed.
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr]).tls(tls).spawn();
    let smuggled = "GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n";
    let request = format!(
        "POST /public HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: Content-Length, close\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let answer = String::from_utf8_lossy(&lb.exchange(request.as_bytes()).await).into_owned();
    assert_eq!(status_of(answer.as_bytes()), Some(200), "{answer}");
    assert!(
        answer.contains("app POST /public\n") && answer.contains(&format!("body={smuggled}")),
        "{answer}"
    );
    assert!(!answer.contains("app GET /admin"), "{answer}");
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unreachable_server_is_503_and_a_silent_one_504() {
    let refusing = lb_tests::servers::refusing().await;
    // Accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let lb = HttpLbBuilder::new(&[refusing])
        .backend("silent", &[silent_addr])
        .top_yaml("timeouts: { server: 1s }\n")
        .listener_yaml("    routes:\n      - { path_prefix: /slow, backend: silent }\n")
        .spawn();
    // Refused, and no other server to retry on: 503 (HAProxy's answer too).
    let answer = raw_exchange(lb.listener, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(
        status_of(&answer),
        Some(503),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let started = Instant::now();
    let answer = raw_exchange(lb.listener, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(
        status_of(&answer),
        Some(504),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "504 before timeouts.server"
    );
    holder.abort();
}

async fn expect_100_continue_is_answered_by_the_server(tls: bool) {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr]).tls(tls).spawn();
    let mut s = lb.connect().await;
    s.write_all(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // The body is sent only after the server's 100, which lb passes on (hyper, behind the
    // reflector, sends it once the body is read).
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut interim))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200 ") && text.contains("body=hello"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("expect: 100-continue"),
        "Expect did not reach the server: {text}"
    );
}

async fn a_malformed_chunked_body_is_refused(tls: bool) {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr]).tls(tls).spawn();
    for body in [
        "5\r\nhello\r\nzz\r\n",
        "5 \r\nhello\r\n0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5\r\nhelloX\r\n0\r\n\r\n",
    ] {
        let request = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        let answer = lb.exchange(request.as_bytes()).await;
        assert_eq!(
            status_of(&answer),
            Some(400),
            "{body:?}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}

async fn a_kept_connection_the_server_closed_is_replaced(tls: bool) {
    // A server that closes after each answer without saying so: lb keeps the connection, finds
    // it closed at the next request, and sends that request again on a new one.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // One request (head, and a body of the length it names), one answer, close.
                let complete = |b: &[u8]| {
                    let text = String::from_utf8_lossy(b);
                    text.find("\r\n\r\n").is_some_and(|end| {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: ")?.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        b.len() >= end + 4 + length
                    })
                };
                while !complete(&buf) {
                    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let lb = HttpLbBuilder::new(&[addr]).tls(tls).spawn();
    let mut c = lb.connect().await;
    for request in [
        &b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody",
        b"GET /4 HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        c.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\nok") {
            let mut b = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "lb closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&b[..n]);
        }
        assert_eq!(
            status_of(&answer),
            Some(200),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    server.abort();
}
