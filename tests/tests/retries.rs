//! Retries with redispatch (`backends[].retries`): a failed connect goes again to a server not
//! tried yet; when none is left, HTTP clients get 503 and TCP clients a closed connection,
//! counted in `lb_backend_unserved_total`.
use lb_tests::{
    http::{raw_exchange, status_of, HttpLbBuilder, Reflector},
    lb::LbBuilder,
    servers,
};
use std::time::Duration;
use tokio::{io::AsyncReadExt, net::TcpStream, time::timeout};

const CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn a_refused_request_still_succeeds_on_the_next_server() {
    let refusing = servers::refusing().await;
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[refusing, app.addr]).spawn();
    // A new server connection for each (Connection: close): each is dispatched anew.
    for _ in 0..10 {
        let answer = raw_exchange(lb.listener, CLOSE).await;
        assert_eq!(
            status_of(&answer),
            Some(200),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let m = lb.metrics();
    let refused = m.get("lb_backend_connect_errors_total{backend=\"app\",server=\"s0\"}");
    assert!(refused >= 1.0, "the refusing server was never tried");
    // Each refusal was retried, and counted.
    assert_eq!(m.get("lb_backend_retries_total{backend=\"app\"}"), refused);
    assert_eq!(
        m.counted("lb_backend_unserved_total{backend=\"app\",reason=\"connect_failed\"}"),
        0.0
    );
}

#[tokio::test]
async fn without_retries_a_refusal_is_503() {
    let refusing = servers::refusing().await;
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[refusing, app.addr])
        .app_yaml("    retries: 0\n")
        .spawn();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(status_of(&raw_exchange(lb.listener, CLOSE).await).unwrap());
    }
    assert!(statuses.contains(&503) && statuses.contains(&200), "{statuses:?}");
    let m = lb.metrics();
    assert_eq!(m.counted("lb_backend_retries_total{backend=\"app\"}"), 0.0);
    let unserved = statuses.iter().filter(|&&s| s == 503).count() as f64;
    assert_eq!(
        m.get("lb_backend_unserved_total{backend=\"app\",reason=\"connect_failed\"}"),
        unserved
    );
}

#[tokio::test]
async fn when_no_server_is_left_http_gets_503_and_tcp_a_closed_connection() {
    let (a, b, c) = (
        servers::refusing().await,
        servers::refusing().await,
        servers::refusing().await,
    );
    let lb = HttpLbBuilder::new(&[a, b, c]).spawn();
    let answer = raw_exchange(lb.listener, CLOSE).await;
    assert_eq!(
        status_of(&answer),
        Some(503),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let m = lb.metrics();
    // Each server tried once: the first attempt and two retries.
    assert_eq!(m.sum("lb_backend_connect_errors_total"), 3.0);
    assert_eq!(m.get("lb_backend_retries_total{backend=\"app\"}"), 2.0);
    assert_eq!(
        m.get("lb_backend_unserved_total{backend=\"app\",reason=\"connect_failed\"}"),
        1.0
    );

    // TCP, retries: 1: two of the three are tried, then the client is closed.
    let lb = LbBuilder::new(&[a, b, c])
        .backend_yaml("    retries: 1\n")
        .spawn();
    let mut client = TcpStream::connect(lb.listener).await.unwrap();
    let mut rest = Vec::new();
    let read = timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("lb kept the client open");
    assert!(rest.is_empty(), "{read:?}");
    let m = lb
        .wait_for("the session counted as unserved", |m| {
            m.counted("lb_backend_unserved_total{backend=\"pool\",reason=\"connect_failed\"}") == 1.0
        })
        .await;
    assert_eq!(m.sum("lb_backend_connect_errors_total"), 2.0);
    assert_eq!(m.get("lb_backend_retries_total{backend=\"pool\"}"), 1.0);
}
