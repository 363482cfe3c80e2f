//! HTTP mode when lb stops (SIGTERM): kept-alive connections do not hold the stop up for
//! `timeouts.shutdown_grace`, as with HAProxy's soft stop.
use lb_tests::http::{read_response, HttpLbBuilder, Reflector};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// Waits (at most 5 s) for lb to close `c`; what it sent before.
async fn closed(c: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("lb kept the connection open")
        .expect("lb reset the connection");
    rest
}

#[tokio::test]
async fn stopping_closes_kept_alive_connections_after_their_answers() {
    let app = Reflector::start("app").await;
    // Neither timeout could close a connection within the test's bounds.
    let mut lb = HttpLbBuilder::new(&[app.addr])
        .top_yaml("timeouts:\n  shutdown_grace: 60s\n  http_keep_alive: 60s\n")
        .spawn();
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
    // Idle between requests when the stop comes.
    let mut idle = TcpStream::connect(lb.listener).await.unwrap();
    idle.write_all(request("/idle").as_bytes()).await.unwrap();
    assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 200"));
    // A request under way (half its head) when the stop comes.
    let mut busy = TcpStream::connect(lb.listener).await.unwrap();
    busy.write_all(request("/busy").as_bytes()).await.unwrap();
    let first = read_response(&mut busy).await;
    assert!(
        !first.to_ascii_lowercase().contains("connection: close"),
        "{first}"
    );
    let next = request("/next");
    let (head, tail) = next.split_at(10);
    busy.write_all(head.as_bytes()).await.unwrap();

    // SAFETY: a signal to our own child.
    unsafe { libc::kill(lb.pid() as i32, libc::SIGTERM) };
    lb.wait_for_log("stopped accepting").await;

    assert_eq!(closed(&mut idle).await, b"");
    busy.write_all(tail.as_bytes()).await.unwrap();
    let last = read_response(&mut busy).await;
    assert!(last.starts_with("HTTP/1.1 200"), "{last}");
    assert!(last.contains("app GET /next"), "{last}");
    assert!(last.to_ascii_lowercase().contains("connection: close"), "{last}");
    assert_eq!(closed(&mut busy).await, b"");
    // Nothing left: lb exits long before the grace period's end.
    let status = lb
        .terminate(Duration::from_secs(10))
        .expect("lb waited for its kept-alive connections");
    assert!(status.success(), "{status}");
}
