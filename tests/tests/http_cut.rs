//! HTTP messages cut midway, against origins lb's code did not write: raw-socket servers in
//! Python that answer as scripted whatever lb does, and Python's http.client as the client.
//! A cut message must never look whole at the far end (a reset, or a 502 when nothing of the
//! response went yet), and the access log counts the bytes that really moved.
use lb_tests::http::{run_tool, status_of, HttpLbBuilder};
use lb_tests::lb::Lb;
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
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
    assert_eq!(status_of(&got), Some(502), "{}", String::from_utf8_lossy(&got));
    let line = record(&lb, "/first\" 502").await;
    assert!(line.ends_with("malformed chunked response body"), "{line}");
    // Only the 502 went out, and the log counts it, not the server's head.
    assert_eq!(field(&line, "out="), got.len() as u64, "{line}");
    drop(c);
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
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    c.write_all(b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(
        text.starts_with("http/1.1 204") && text.contains("x-seen: yes"),
        "{text}"
    );
    assert!(!text.contains("content-length"), "{text}");
    drop(c);
    origin.report().await;
}
