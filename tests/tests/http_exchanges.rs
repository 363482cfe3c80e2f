//! HTTP exchanges that do not go by the book, against peers lb's code did not write: raw-socket
//! origins in Python that answer as scripted whatever lb does, nginx, curl and Python's
//! http.client.
//! - A message cut midway never looks whole at the far end (a reset, or a 502 when nothing of
//!   the response went yet), and the access log counts the bytes that really moved.
//! - A request body and its response move at once: an early answer reaches the client while it
//!   uploads, `Expect: 100-continue` is the server's to answer, a full-duplex exchange flows.
use lb_tests::http::{raw_exchange, run_tool, status_of, HttpLbBuilder};
use lb_tests::{daemons::Daemon, lb::Lb, program_available};
use std::{net::SocketAddr, process::Stdio, time::Duration};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, ChildStdout, Command},
};

/// A one-connection origin in Python: it accepts, reads the request head into `head`, then runs
/// `script` with the socket as `c` (helpers: `reset(c)` closes with a reset, `drain(c)` reads
/// until the end and prints `eof N` or `reset N`, N the body bytes after the head).
struct PyOrigin {
    child: Child,
    addr: SocketAddr,
    out: BufReader<ChildStdout>,
}

const PRELUDE: &str = r#"
import socket, struct, sys
def reset(c):
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
def drain(c, got=0):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                print("eof", got, flush=True)
                return
            got += len(d)
    except ConnectionResetError:
        print("reset", got, flush=True)
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
l.settimeout(30)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
c.settimeout(30)
head = b""
while b"\r\n\r\n" not in head:
    d = c.recv(65536)
    if not d:
        break
    head += d
rest = head[head.find(b"\r\n\r\n") + 4:]
"#;

impl PyOrigin {
    async fn start(script: &str) -> PyOrigin {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(format!("{PRELUDE}{script}"))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut port = String::new();
        tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut port))
            .await
            .expect("the origin did not say its port")
            .unwrap();
        let addr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();
        PyOrigin { child, addr, out }
    }

    /// What the origin printed after its port, once it ended (at most 30 s).
    async fn report(mut self) -> String {
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(30), self.out.read_to_string(&mut text))
            .await
            .expect("the origin did not end")
            .unwrap();
        let _ = self.child.wait().await;
        text
    }
}

/// The access-log record of `request` (`"GET 127.0.0.1 /x"`), once written.
async fn record(lb: &Lb, request: &str) -> String {
    lb.wait_for_log(request).await;
    lb.log()
        .lines()
        .find(|l| l.contains(request))
        .unwrap()
        .to_string()
}

/// The number after `key` (`in=`, `out=`) in an access-log record.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Python's http.client GETs `path` through lb and says whether the body came `complete` or
/// was `cut` (any error while reading it).
async fn python_get(lb: SocketAddr, path: &str) -> String {
    let script = format!(
        r#"
import http.client
c = http.client.HTTPConnection("{}", {}, timeout=10)
c.request("GET", "{path}")
r = c.getresponse()
try:
    b = r.read()
    print("complete", r.status, len(b))
except Exception as e:
    print("cut", r.status, type(e).__name__)
"#,
        lb.ip(),
        lb.port()
    );
    run_tool("python3", &["-c", &script]).await
}

#[tokio::test]
async fn a_chunked_response_cut_in_its_trailers_never_looks_complete() {
    // Malformed trailers, trailers past lb's limit, and a close before the final CRLF, after a
    // chunk of 1 MiB (lb reads at most 64 KiB at once: the head went before the fault came):
    // each time the client must not see a complete body, and the log says why.
    let long = format!("X-Long: {}\\r\\n", "y".repeat(20_000));
    for (trailers, note) in [
        ("bad trailer\\r\\n\\r\\n", "malformed chunked response body"),
        (long.as_str(), "malformed chunked response body"),
        ("X-Sum: 1\\r\\n", "server failed within the response body"),
    ] {
        let origin = PyOrigin::start(&format!(
            r#"
c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n" + b"x" * 0x100000 + b"\r\n0\r\n{trailers}")
c.close()
print("sent", flush=True)
"#
        ))
        .await;
        let lb = HttpLbBuilder::new(&[origin.addr]).spawn();
        let got = python_get(lb.listener, "/trailers").await;
        assert!(got.starts_with("cut 200"), "{trailers:?}: the client saw {got}");
        let line = record(&lb, "/trailers\" 200").await;
        assert!(line.ends_with(note), "{line}");
        assert_eq!(origin.report().await.trim(), "sent");
    }
}

#[tokio::test]
async fn a_bad_first_chunk_that_came_with_the_head_gets_a_502() {
    let origin = PyOrigin::start(
        r#"
c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
drain(c)
"#,
    )
    .await;
    let lb = HttpLbBuilder::new(&[origin.addr]).spawn();
    let got = raw_exchange(lb.listener, b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(status_of(&got), Some(502), "{}", String::from_utf8_lossy(&got));
    let line = record(&lb, "/first\" 502").await;
    assert!(line.ends_with("malformed chunked response body"), "{line}");
    // Only the 502 went out, and the log counts it, not the server's head.
    assert_eq!(field(&line, "out="), got.len() as u64, "{line}");
    origin.report().await;
}

#[tokio::test]
async fn an_aborted_upload_reaches_the_origin_as_a_reset() {
    let origin = PyOrigin::start("drain(c, len(rest))\n").await;
    let lb = HttpLbBuilder::new(&[origin.addr]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    c.write_all(&[7u8; 100_000]).await.unwrap();
    // The client gives up a tenth of the way.
    c.shutdown().await.unwrap();
    let report = origin.report().await;
    let (how, got) = report.trim().split_once(' ').unwrap();
    assert_eq!(how, "reset", "the origin saw the upload end as: {report}");
    let line = record(&lb, "/up\" 400").await;
    // lb counts the body bytes it forwarded; the origin got them, or lost some to the reset.
    assert!(field(&line, "in=") >= 100_000, "{line}");
    assert!(got.parse::<u64>().unwrap() <= 100_000, "{report}");
}

#[tokio::test]
async fn a_response_cut_by_its_server_is_counted_as_far_as_it_went() {
    // 3 MB of a 10 MB body, then the server goes away (closes: what a killed process does).
    let origin = PyOrigin::start(
        r#"
c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 3000000)
c.close()
print("sent", flush=True)
"#,
    )
    .await;
    let lb = HttpLbBuilder::new(&[origin.addr]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
    assert!(ended.is_ok(), "lb did not end the cut response");
    let line = record(&lb, "/big\" 200").await;
    assert!(line.ends_with("server failed within the response body"), "{line}");
    let out = field(&line, "out=");
    assert!(out > 3_000_000, "{line}");
    assert!(
        out >= got.len() as u64,
        "the client got {} bytes: {line}",
        got.len()
    );
    origin.report().await;
}

#[tokio::test]
async fn a_413_counts_the_body_that_reached_the_server() {
    let origin = PyOrigin::start("drain(c, len(rest))\n").await;
    let lb = HttpLbBuilder::new(&[origin.addr])
        .top_yaml("limits: { max_body_bytes: 1MiB }\n")
        .spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = [b"10000\r\n".as_slice(), &[9u8; 0x10000], b"\r\n"].concat();
    let sender = tokio::spawn(async move {
        // 2 MiB in 64 KiB chunks; lb stops reading past 1 MiB, so writes may fail.
        for _ in 0..32 {
            if c.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
        got
    });
    let line = record(&lb, "/big\" 413").await;
    let report = origin.report().await;
    let (how, got) = report.trim().split_once(' ').unwrap();
    assert_eq!(how, "reset", "the origin saw the refused upload end as: {report}");
    // Up to the limit, less the batch that crossed it.
    let forwarded = field(&line, "in=");
    assert!(forwarded > 900_000, "{line}");
    assert!(got.parse::<u64>().unwrap() <= forwarded, "{report} {line}");
    let answer = sender.await.unwrap();
    assert_eq!(
        status_of(&answer),
        Some(413),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn a_204_says_nothing_of_a_body() {
    let origin = PyOrigin::start(
        r#"
c.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-Seen: yes\r\n\r\n")
drain(c)
"#,
    )
    .await;
    let lb = HttpLbBuilder::new(&[origin.addr]).spawn();
    let got = raw_exchange(
        lb.listener,
        b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(
        text.starts_with("http/1.1 204") && text.contains("x-seen: yes"),
        "{text}"
    );
    assert!(!text.contains("content-length"), "{text}");
    origin.report().await;
}

/// nginx refusing bodies over 1 KiB, closing at once after its answer (no lingering close: a
/// client still sending then meets a reset); `/` answers 200.
fn nginx_with_a_body_limit() -> Daemon {
    Daemon::nginx(
        "  server {\n    listen 127.0.0.1:{PORT};\n    client_max_body_size 1k;\n    \
         lingering_close off;\n    location / { return 200 \"ok\\n\"; }\n  }",
    )
}

#[tokio::test]
async fn an_early_413_reaches_the_client_while_it_uploads() {
    if !program_available("an_early_413_reaches_the_client_while_it_uploads", "nginx") {
        return;
    }
    let nginx = nginx_with_a_body_limit();
    let lb = HttpLbBuilder::new(&[nginx.addr]).spawn();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload");
    std::fs::write(&file, vec![b'u'; 4 << 20]).unwrap();
    let data = format!("@{}", file.display());
    let url = format!("http://{}/upload", lb.listener);
    let curl = |expect: &'static str| {
        let (data, url) = (data.clone(), url.clone());
        async move {
            let args = [
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_upload}",
                "--max-time",
                "20",
            ];
            let out = run_tool(
                "curl",
                &[&args[..], &["-H", expect, "--data-binary", &data, &url]].concat(),
            )
            .await;
            let (code, sent) = out.trim().split_once(' ').unwrap();
            (code.to_string(), sent.parse::<u64>().unwrap())
        }
    };
    // With `Expect: 100-continue`, nginx answers 413 before the body: curl, told at once, sends
    // none of it (lb passes the expectation on instead of answering 100 itself).
    let (code, sent) = curl("Expect: 100-continue").await;
    assert_eq!(code, "413", "{}\n{}", lb.log(), nginx.log());
    assert!(sent < 1 << 20, "curl sent {sent} bytes of a refused body");
    // Without it, nginx answers while the body comes and closes: curl must get that 413, not a
    // 502 made of the reset that meets the rest of the upload.
    let (code, _) = curl("Expect:").await;
    assert_eq!(code, "413", "{}\n{}", lb.log(), nginx.log());
    let log = lb.log();
    assert!(log.contains("\"POST 127.0.0.1 /upload\" 413"), "{log}");
    assert!(!log.contains(" 502 "), "{log}");
}

#[tokio::test]
async fn the_servers_100_continue_reaches_the_client_before_it_sends_the_body() {
    // The origin answers `Expect: 100-continue` with its own 100, then reads the body and
    // tells what it got: the 100 is the server's, passed on (lb does not answer it).
    let origin = PyOrigin::start(
        r#"
assert b"expect: 100-continue" in head.lower(), head
c.sendall(b"HTTP/1.1 100 Continue\r\nX-From: origin\r\n\r\n")
body = rest
while len(body) < 5:
    body += c.recv(65536)
c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ngot " + body[:3])
drain(c)
"#,
    )
    .await;
    let lb = HttpLbBuilder::new(&[origin.addr]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let interim = read_until(&mut c, b"\r\n\r\n").await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n") && interim.contains("X-From: origin"),
        "{interim}"
    );
    c.write_all(b"hello").await.unwrap();
    let answer = read_until(&mut c, b"got hel").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    drop(c);
    origin.report().await;
}

#[tokio::test]
async fn a_full_duplex_exchange_flows_both_ways() {
    // The origin answers at once and echoes each chunk of the request as it arrives; the
    // client sends the next chunk only once it got the echo of the last one.
    let origin = PyOrigin::start(
        r#"
c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
buf = rest
def more():
    global buf
    d = c.recv(65536)
    if not d:
        raise SystemExit("request cut")
    buf += d
echoed = 0
while True:
    while b"\r\n" not in buf:
        more()
    line, buf = buf.split(b"\r\n", 1)
    size = int(line, 16)
    if size == 0:
        while not buf.startswith(b"\r\n"):
            more()
        c.sendall(b"0\r\n\r\n")
        print("echoed", echoed, flush=True)
        break
    while len(buf) < size + 2:
        more()
    c.sendall(b"%x\r\n" % size + buf[:size] + b"\r\n")
    buf = buf[size + 2:]
    echoed += 1
drain(c)
"#,
    )
    .await;
    let lb = HttpLbBuilder::new(&[origin.addr]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    for i in 0..5 {
        c.write_all(format!("5\r\nping{i}\r\n").as_bytes()).await.unwrap();
        seen += &read_until(&mut c, format!("ping{i}\r\n").as_bytes()).await;
    }
    c.write_all(b"0\r\n\r\n").await.unwrap();
    seen += &read_until(&mut c, b"0\r\n\r\n").await;
    assert!(seen.starts_with("HTTP/1.1 200 OK\r\n"), "{seen}");
    drop(c);
    assert_eq!(origin.report().await.lines().next(), Some("echoed 5"));
}

#[tokio::test]
async fn timeouts_server_waits_for_the_upload_to_end() {
    // timeouts.server is 1 s; the body takes 1.5 s to come (three parts, paced by the test as a
    // slow client would): the server, still receiving, must not be timed out meanwhile.
    let origin = PyOrigin::start(
        r#"
body = rest
while len(body) < 9:
    body += c.recv(65536)
c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
drain(c)
"#,
    )
    .await;
    let lb = HttpLbBuilder::new(&[origin.addr])
        .top_yaml("timeouts: { server: 1s }\n")
        .spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n")
        .await
        .unwrap();
    for part in [b"abc", b"def", b"ghi"] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.write_all(part).await.unwrap();
    }
    let answer = read_until(&mut c, b"ok").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    drop(c);
    origin.report().await;
}

/// Reads from `c` until what came ends with `end` (at most 10 s); what came, as text.
async fn read_until(c: &mut TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !got.ends_with(end) {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        got.ends_with(end),
        "waited for {:?}, got {text:?}",
        String::from_utf8_lossy(end)
    );
    text
}
