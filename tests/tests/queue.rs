//! `maxconn` per server and the backend's queue (`timeouts.queue`): a session that finds every
//! server full waits for a slot, and gets 503 (HTTP) or a closed connection (TCP) when none
//! frees in time.
use lb_tests::{
    http::{read_response, status_of, HttpLbBuilder, Reflector},
    lb::{Lb, LbBuilder},
    servers,
};
use std::time::{Duration, Instant};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

async fn until_queued(lb: &Lb, backend: &str, n: f64) {
    let series = format!("lb_backend_queue{{backend=\"{backend}\"}}");
    lb.wait_for(&format!("{n} queued"), |m| m.counted(&series) == n)
        .await;
}

/// A request whose body is still coming: it holds its server's slot until the rest is sent.
const HALF_POST: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello";

/// An lb whose one server has maxconn 1 (`timeouts.queue` as given), and a first request
/// holding that slot, its body still coming.
async fn hold_the_only_slot(queue: &str) -> (Reflector, Lb, TcpStream) {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .server_options("maxconn: 1")
        .top_yaml(&format!("timeouts: {{ queue: {queue} }}\n"))
        .spawn();
    let mut first = TcpStream::connect(lb.listener).await.unwrap();
    first.write_all(HALF_POST).await.unwrap();
    lb.wait_for("the first request at the server", |m| {
        m.get("lb_backend_active_sessions{backend=\"app\",server=\"s0\"}") == 1.0
    })
    .await;
    (app, lb, first)
}

#[tokio::test]
async fn the_second_request_waits_for_the_first_to_finish() {
    let (_app, lb, mut first) = hold_the_only_slot("30s").await;
    let mut second = TcpStream::connect(lb.listener).await.unwrap();
    second.write_all(GET).await.unwrap();
    until_queued(&lb, "app", 1.0).await;
    // Queued, not answered.
    let mut probe = [0u8; 1];
    assert!(
        matches!(second.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the queued client got an answer"
    );
    // The first request ends: its slot goes to the second, while the first client stays
    // connected (an idle kept-alive client holds no slot).
    first.write_all(b"world").await.unwrap();
    assert_eq!(status_of(read_response(&mut first).await.as_bytes()), Some(200));
    assert_eq!(status_of(read_response(&mut second).await.as_bytes()), Some(200));
    until_queued(&lb, "app", 0.0).await;
    // And the first client's next request is served in its turn.
    first.write_all(GET).await.unwrap();
    assert_eq!(status_of(read_response(&mut first).await.as_bytes()), Some(200));
}

#[tokio::test]
async fn a_request_queued_past_timeouts_queue_gets_503() {
    let (app, lb, mut first) = hold_the_only_slot("300ms").await;
    let started = Instant::now();
    let mut second = TcpStream::connect(lb.listener).await.unwrap();
    second.write_all(GET).await.unwrap();
    assert_eq!(status_of(read_response(&mut second).await.as_bytes()), Some(503));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "503 before the queue timeout"
    );
    let m = lb.metrics();
    assert_eq!(
        m.get("lb_backend_unserved_total{backend=\"app\",reason=\"queue_timeout\"}"),
        1.0
    );
    assert_eq!(app.connections(), 1);
    first.write_all(b"world").await.unwrap();
    assert_eq!(status_of(read_response(&mut first).await.as_bytes()), Some(200));
}

#[tokio::test]
async fn tcp_flows_queue_too() {
    let server = servers::named(7).await;
    let lb = LbBuilder::new(&[server])
        .server_options("maxconn: 1")
        .backend_yaml("    timeouts: { queue: 30s }\n")
        .spawn();
    let read_id = |mut s: TcpStream| async move {
        let mut id = [0u8; 1];
        timeout(Duration::from_secs(10), s.read_exact(&mut id))
            .await
            .expect("no id within 10 s")
            .unwrap();
        (id[0], s)
    };
    let (id, first) = read_id(TcpStream::connect(lb.listener).await.unwrap()).await;
    assert_eq!(id, 7);
    let second = TcpStream::connect(lb.listener).await.unwrap();
    until_queued(&lb, "pool", 1.0).await;
    drop(first);
    let (id, _second) = read_id(second).await;
    assert_eq!(id, 7);
    assert_eq!(
        lb.metrics()
            .get("lb_backend_active_sessions{backend=\"pool\",server=\"s0\"}"),
        1.0
    );
}
