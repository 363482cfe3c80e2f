//! HTTP mode's hand-off of a closing response to the kernel: after a response lb closes the
//! connection with, the rest of its body (past `forwarding.offload_after`) is forwarded by the
//! kernel, server to client only; the client's later bytes never reach the server.
use lb_tests::{
    bpf_available,
    http::{pattern, raw_exchange, status_of, HttpLbBuilder, Reflector, Scripted},
    lb::Lb,
};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Body bytes the backend sends before it waits: past offload_after (64 KiB by default), so
/// lb hands the body off within them.
const FIRST: usize = 128 << 10;
/// Body bytes it sends after.
const REST: usize = 1 << 20;

/// Reads until `done(bytes so far)` holds or the connection ends (at most 30 s).
async fn read_until(c: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    tokio::time::timeout(Duration::from_secs(30), async {
        while !done(&got) {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the client read timed out");
    got
}

/// Splits a response into its head (lowercased) and what follows it.
fn split_response(bytes: &[u8]) -> (String, &[u8]) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete head in {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )
        })
        + 4;
    (
        String::from_utf8_lossy(&bytes[..end]).to_lowercase(),
        &bytes[end..],
    )
}

/// A response head and its body's first FIRST bytes, and the rest of the body.
fn content_length_response(extra: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let body = pattern(FIRST + REST);
    let mut first = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    first.extend_from_slice(&body[..FIRST]);
    let mut rest = body[FIRST..].to_vec();
    rest.extend_from_slice(extra);
    (first, rest, body)
}

/// The value of `key=` in the access-log record of `request` (e.g. `"GET a /big" 200`), written
/// when its flow ended; and the record itself.
async fn record_field(lb: &Lb, request: &str, key: &str) -> (u64, String) {
    lb.wait_for_log(request).await;
    let log = lb.log();
    let line = log.lines().find(|l| l.contains(request)).unwrap().to_string();
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    (value, line)
}

/// The NOTE of a text access-log record: what follows its times.
fn note(line: &str) -> &str {
    let (_, after) = line
        .split_once(" t=")
        .unwrap_or_else(|| panic!("no times in {line}"));
    after.split_once(' ').map_or("", |(_, note)| note.trim())
}

/// A scripted backend sending `first`, then `rest` when told; an lb in front of it; and a client
/// that sent `request` through lb.
async fn start(first: Vec<u8>, rest: Vec<u8>, request: &[u8]) -> (Scripted, Lb, TcpStream) {
    let backend = Scripted::start(first, rest).await;
    let lb = HttpLbBuilder::new(&[backend.addr]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(request).await.unwrap();
    (backend, lb, c)
}

/// Waits until lb has handed the response's flow to the kernel.
async fn in_kernel(lb: &Lb) {
    lb.wait_for("the body's flow in the kernel", |m| {
        m.get("lb_kernel_flows") == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_closing_response_body_goes_to_the_kernel_and_later_client_bytes_never_reach_the_server() {
    if !bpf_available(
        "a_closing_response_body_goes_to_the_kernel_and_later_client_bytes_never_reach_the_server",
    ) {
        return;
    }
    let (first, rest, body) = content_length_response(b"");
    // A pipelined request behind the one that asks to close: held by lb, never sent on.
    let request = b"GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /pipelined HTTP/1.1\r\nHost: a\r\n\r\n";
    let (mut backend, lb, mut c) = start(first, rest, request).await;
    let mut got = read_until(&mut c, |b| b.windows(4).any(|w| w == b"\r\n\r\n")).await;
    let head_len = split_response(&got).0.len();
    got.extend(read_until(&mut c, |b| got.len() + b.len() >= head_len + FIRST).await);
    // The rest of the body is the kernel's; what the client sends now goes through the
    // program, which holds it for lb, which drops it.
    in_kernel(&lb).await;
    c.write_all(b"POST /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    // Nor does its half-close, which a server may take for the client giving up: watched for
    // a bounded while (an absence shows no other way).
    c.shutdown().await.unwrap();
    lb.wait_for("the client's bytes held for lb", |m| {
        m.get("lb_kernel_passed_bytes_total") >= 55.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    backend.go();
    got.extend(read_until(&mut c, |_| false).await);
    // The server closed (as lb asked it to): the flow ended.
    let received = backend.received().await;
    assert!(
        !received.ended_before_go,
        "the client's half-close reached the server mid-response"
    );
    let seen = String::from_utf8_lossy(&received.bytes).into_owned();
    assert!(seen.starts_with("GET /big HTTP/1.1\r\n"), "{seen}");
    assert!(seen.contains("\r\nConnection: close\r\n"), "{seen}");
    assert!(
        !seen.contains("pipelined") && !seen.contains("smuggled"),
        "client bytes past the request reached the server:\n{seen}"
    );
    let (head, got_body) = split_response(&got);
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        got_body == body,
        "the client got {} of {} body bytes, or altered",
        got_body.len(),
        body.len()
    );
    let (kernel, line) = record_field(&lb, "\"GET a /big\" 200", "kernel=").await;
    assert!(kernel >= REST as u64, "{line}");
    let (out, line) = record_field(&lb, "\"GET a /big\" 200", "out=").await;
    assert_eq!(out, got.len() as u64, "{line}");
    assert_eq!(note(&line), "", "{line}");
    let m = lb.metrics();
    assert!(m.kernel_bytes() >= REST as f64, "{}", m.text);
    assert_eq!(m.get("lb_kernel_tracked_sockets"), 0.0, "{}", m.text);
}

#[tokio::test]
async fn a_server_sending_past_its_content_length_gets_no_byte_further() {
    if !bpf_available("a_server_sending_past_its_content_length_gets_no_byte_further") {
        return;
    }
    // The body's last bytes and the excess leave in one write (so share segments): the
    // program cuts the segment at the body's end and drops the rest (RFC 9112 §6.3); lb's
    // record says what happened.
    let (first, rest, body) = content_length_response(b"HTTP/1.1 200 OK\r\n\r\nextra");
    let (mut backend, lb, mut c) = start(
        first,
        rest,
        b"GET /past HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    in_kernel(&lb).await;
    backend.go();
    let got = read_until(&mut c, |_| false).await;
    drop(c);
    let (_, got_body) = split_response(&got);
    assert!(
        got_body == body,
        "the client got {} bytes of a {}-byte body, or altered",
        got_body.len(),
        body.len()
    );
    let (_, line) = record_field(&lb, "\"GET a /past\" 200", "kernel=").await;
    assert_eq!(
        note(&line),
        "server sent past its Content-Length (dropped)",
        "{line}"
    );
    let (out, _) = record_field(&lb, "\"GET a /past\" 200", "out=").await;
    assert_eq!(out, got.len() as u64, "{line}");
    backend.received().await;
}

#[tokio::test]
async fn a_chunked_closing_response_goes_to_the_kernel() {
    if !bpf_available("a_chunked_closing_response_goes_to_the_kernel") {
        return;
    }
    let data = pattern(FIRST + REST);
    let mut first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    first.extend_from_slice(format!("{FIRST:x}\r\n").as_bytes());
    first.extend_from_slice(&data[..FIRST]);
    let mut rest = format!("\r\n{REST:x}\r\n").into_bytes();
    rest.extend_from_slice(&data[FIRST..]);
    rest.extend_from_slice(b"\r\n0\r\n\r\n");
    let chunked_len =
        first.len() + rest.len() - b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".len();
    let (mut backend, lb, mut c) = start(
        first,
        rest,
        b"GET /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    in_kernel(&lb).await;
    backend.go();
    let got = read_until(&mut c, |b| b.ends_with(b"\r\n0\r\n\r\n")).await;
    drop(c);
    let (head, got_body) = split_response(&got);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(got_body.len(), chunked_len);
    let mut expected = format!("{FIRST:x}\r\n").into_bytes();
    expected.extend_from_slice(&data[..FIRST]);
    assert!(got_body.starts_with(&expected), "the first chunk arrived altered");
    assert!(
        got_body[got_body.len() - REST - 7..got_body.len() - 7] == data[FIRST..],
        "the second chunk arrived altered"
    );
    let seen = String::from_utf8_lossy(&backend.received().await.bytes).into_owned();
    assert!(seen.starts_with("GET /chunked HTTP/1.1\r\n"), "{seen}");
    let (kernel, line) = record_field(&lb, "\"GET a /chunked\" 200", "kernel=").await;
    assert!(kernel >= REST as u64, "{line}");
    assert_eq!(note(&line), "", "{line}");
}

#[tokio::test]
async fn a_closing_response_the_kernel_cannot_take_goes_on_in_userspace_one_way() {
    if !bpf_available("a_closing_response_the_kernel_cannot_take_goes_on_in_userspace_one_way") {
        return;
    }
    let (first, rest, body) = content_length_response(b"");
    // The backend answers only when told, all at once.
    let (mut backend, lb, mut c) = start(
        Vec::new(),
        [first, rest].concat(),
        b"GET /half HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    // Sent once lb has the request and went on to the server: left in the socket for the
    // forwarding stage, which must drop it. Then the client half-closes: its socket is no
    // longer ESTABLISHED, which the kernel path refuses.
    lb.wait_for("the server connection", |m| {
        m.get("lb_backend_connections_total{backend=\"app\",server=\"s0\"}") == 1.0
    })
    .await;
    c.write_all(b"GET /pipelined HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    c.shutdown().await.unwrap();
    backend.go();
    let got = read_until(&mut c, |_| false).await;
    let seen = String::from_utf8_lossy(&backend.received().await.bytes).into_owned();
    assert!(seen.starts_with("GET /half HTTP/1.1\r\n"), "{seen}");
    assert!(
        !seen.contains("pipelined"),
        "a pipelined request reached the server:\n{seen}"
    );
    let (_, got_body) = split_response(&got);
    assert!(
        got_body == body,
        "the client got {} of {} body bytes, or altered",
        got_body.len(),
        body.len()
    );
    let (out, line) = record_field(&lb, "\"GET a /half\" 200", "out=").await;
    assert_eq!(out, got.len() as u64, "{line}");
    let m = lb.metrics();
    assert_eq!(
        m.counted("lb_kernel_fallbacks_total{reason=\"ended\"}"),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(m.kernel_bytes(), 0.0, "{}", m.text);
}

#[tokio::test]
async fn a_short_closing_response_stays_in_userspace() {
    if !bpf_available("a_short_closing_response_stays_in_userspace") {
        return;
    }
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr]).spawn();
    // Under offload_after (64 KiB): the kernel path's set-up would cost more than it saves.
    let answer = raw_exchange(
        lb.listener,
        b"GET /size/60000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), Some(200));
    assert_eq!(split_response(&answer).1.len(), 60_000);
    let (kernel, line) = record_field(&lb, "\"GET a /size/60000\" 200", "kernel=").await;
    assert_eq!(kernel, 0, "{line}");
    let m = lb.metrics();
    assert_eq!(m.kernel_bytes(), 0.0, "{}", m.text);
    assert_eq!(m.sum("lb_kernel_fallbacks_total"), 0.0, "{}", m.text);
}
