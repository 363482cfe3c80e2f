//! Health end to end: active checks (`health_check:`) take a dead server out of the rotation
//! and bring it back, and passive checks (`observe:`) eject a server that live traffic finds
//! failing. Servers are in-process, on 127.0.0.1.
use lb_tests::{
    bpf_available,
    http::{raw_exchange, status_of, HttpLbBuilder, Reflector},
    lb::{Lb, LbBuilder},
    servers,
};
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::timeout,
};

/// A server that sends its id byte on each connection, then echoes; stopping it closes its
/// listener (new connections are refused) but not the connections it has.
struct Killable {
    addr: SocketAddr,
    id: u8,
    accept: JoinHandle<()>,
}

impl Killable {
    async fn start(id: u8, addr: SocketAddr) -> Killable {
        let l = TcpListener::bind(addr).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    if s.write_all(&[id]).await.is_ok() {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
            }
        });
        Killable { addr, id, accept }
    }

    /// Closes the listener (the accept task owns it).
    async fn kill(self) -> (u8, SocketAddr) {
        self.accept.abort();
        let _ = self.accept.await;
        (self.id, self.addr)
    }
}

/// A flow through lb: the id of the server it reached, and the flow.
async fn flow(lb: SocketAddr) -> Option<(u8, TcpStream)> {
    let mut s = TcpStream::connect(lb).await.ok()?;
    let mut id = [0u8; 1];
    match timeout(Duration::from_secs(10), s.read_exact(&mut id)).await {
        Ok(Ok(_)) => Some((id[0], s)),
        // lb closed it: the server it picked could not be reached.
        Ok(Err(_)) => None,
        Err(_) => panic!("no id and no close within 10 s"),
    }
}

fn up(server: usize) -> String {
    format!("lb_server_up{{backend=\"pool\",server=\"s{server}\"}}")
}

/// Polls until `server`'s `lb_server_up` is `want`; how long that took.
async fn until_up_is(lb: &Lb, server: usize, want: f64) -> Duration {
    let start = Instant::now();
    lb.wait_for(&format!("s{server} up={want}"), |m| m.get(&up(server)) == want)
        .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_goes_down_within_fall_checks_and_comes_back_after_rise() {
    if !bpf_available("a_dead_server_goes_down_within_fall_checks_and_comes_back_after_rise") {
        return;
    }
    let s0 = Killable::start(0, "127.0.0.1:0".parse().unwrap()).await;
    let s1 = Killable::start(1, "127.0.0.1:0".parse().unwrap()).await;
    // interval × fall = 600 ms to go DOWN, interval × rise = 400 ms to come back.
    // Flows go to the kernel at once (spliced), as established flows do past offload_after.
    let lb = LbBuilder::new(&[s0.addr, s1.addr])
        .forwarding("kernel")
        .offload_after("0")
        .backend_yaml("    health_check: { kind: tcp, interval: 200ms, rise: 2, fall: 3 }\n")
        .spawn();
    assert_eq!(lb.metrics().get(&up(0)), 1.0);
    // A flow on each server, held across what follows.
    let (a, mut held_a) = flow(lb.listener).await.unwrap();
    let (b, mut held_b) = flow(lb.listener).await.unwrap();
    assert_eq!((a, b), (0, 1));

    let (_, s0_addr) = s0.kill().await;
    let took = until_up_is(&lb, 0, 0.0).await;
    // Within fall × interval of the kill, with room for the metrics polling (20 ms steps) and a
    // busy machine.
    assert!(took <= Duration::from_millis(600 + 400), "DOWN after {took:?}");
    assert!(
        lb.log().contains("server is DOWN: 3 check(s) failed"),
        "{}",
        lb.log()
    );
    // No new flow goes to it.
    for _ in 0..10 {
        let (id, _) = flow(lb.listener)
            .await
            .expect("a flow was sent to the dead server");
        assert_eq!(id, 1);
    }
    // The flow already on the other server is untouched.
    held_b.write_all(b"still there").await.unwrap();
    let mut echo = [0u8; 11];
    timeout(Duration::from_secs(10), held_b.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"still there");
    // ... forwarded by the kernel.
    let m = lb.metrics();
    assert!(m.get("lb_kernel_flows") >= 2.0, "{}", m.text);
    assert!(m.kernel_bytes() >= 22.0, "{}", m.text);
    // And the one on the dead server's listener too: killing a listener ends no connection.
    held_a.write_all(b"x").await.unwrap();

    let _s0 = Killable::start(0, s0_addr).await;
    let took = until_up_is(&lb, 0, 1.0).await;
    assert!(took <= Duration::from_millis(400 + 400), "UP after {took:?}");
    let mut seen = [0; 2];
    for _ in 0..10 {
        seen[usize::from(flow(lb.listener).await.unwrap().0)] += 1;
    }
    assert_eq!(seen, [5, 5]);
    drop(s1);
}

#[tokio::test]
async fn an_http_check_wants_a_good_status() {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .app_yaml("    health_check: { kind: http, path: /status/503, interval: 100ms, fall: 2 }\n")
        .spawn();
    lb.wait_for("the server DOWN", |m| {
        m.get("lb_server_up{backend=\"app\",server=\"s0\"}") == 0.0
    })
    .await;
    assert!(lb.log().contains("last: status 503"), "{}", lb.log());
    let answer = raw_exchange(lb.listener, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(status_of(&answer), Some(503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_errors_eject_a_server_until_its_check_passes() {
    let refusing = servers::refusing().await;
    let good = servers::named(1).await;
    // Checks every hour: only the one at start runs, so only live traffic takes it down.
    let lb = LbBuilder::new(&[refusing, good])
        .backend_yaml(
            "    health_check: { interval: 1h, fall: 3 }\n    observe: { max_consecutive_errors: 3 }\n",
        )
        .spawn();
    // Every flow is served: a failed connect is retried on the other server (retries: 3).
    for _ in 0..20 {
        let (id, _) = flow(lb.listener).await.expect("a flow went unserved");
        assert_eq!(id, 1);
    }
    // Round robin tried it for every other flow until the third failure in a row took it down.
    let m = lb.metrics();
    assert_eq!(m.get(&up(0)), 0.0);
    assert_eq!(
        m.get("lb_backend_connect_errors_total{backend=\"pool\",server=\"s0\"}"),
        3.0
    );
    assert_eq!(m.get("lb_backend_retries_total{backend=\"pool\"}"), 3.0);
    assert!(
        lb.log()
            .contains("server is DOWN: 3 errors in a row from live traffic"),
        "{}",
        lb.log()
    );
}

/// Answers every request with a 500 and closes.
async fn failing_http() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http_server_answering_5xx_is_ejected() {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[failing_http().await, app.addr])
        .app_yaml("    health_check: { interval: 1h }\n    observe: { max_consecutive_errors: 3 }\n")
        .spawn();
    // A new server connection for each request: each connect succeeds, each answer is a 500.
    let get = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(status_of(&raw_exchange(lb.listener, get).await).unwrap());
    }
    // Round robin: every other request until the third 500 in a row took it down.
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), 3, "{statuses:?}");
    assert!(statuses[6..].iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(
        lb.metrics().get("lb_server_up{backend=\"app\",server=\"s0\"}"),
        0.0
    );
}
