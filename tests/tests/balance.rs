//! Balancing end to end: real flows through lb to servers that say who they are
//! (`servers::named`), for each `balance:` algorithm. The algorithms' finer properties (how
//! many of 1,000 simulated clients move when a server goes, exact interleaving) are unit tests
//! in lb-user's `balance` module.
use lb_tests::{
    http::{HttpLbBuilder, Reflector},
    lb::LbBuilder,
    servers,
};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::timeout,
};

/// Opens a flow through lb (from `source`, a loopback address, when given) and returns the
/// id of the server it reached, and the flow (held open until dropped).
async fn flow(lb: SocketAddr, source: Option<Ipv4Addr>) -> (u8, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0)).unwrap();
    }
    let mut s = timeout(Duration::from_secs(10), socket.connect(lb))
        .await
        .expect("connect timed out")
        .unwrap();
    let mut id = [0u8; 1];
    timeout(Duration::from_secs(10), s.read_exact(&mut id))
        .await
        .expect("no server id within 10 s")
        .expect("the flow ended before the server's id");
    (id[0], s)
}

/// Servers `0..n`, each saying its index.
async fn named(n: u8) -> Vec<SocketAddr> {
    let mut v = Vec::new();
    for id in 0..n {
        v.push(servers::named(id).await);
    }
    v
}

/// Runs `total` short flows, `parallel` at a time; how many reached each of `n` servers.
async fn spread(lb: SocketAddr, n: usize, total: usize, parallel: usize) -> Vec<usize> {
    let mut count = vec![0; n];
    for batch in 0..total.div_ceil(parallel) {
        let size = parallel.min(total - batch * parallel);
        let flows: Vec<_> = (0..size).map(|_| tokio::spawn(flow(lb, None))).collect();
        for f in flows {
            count[usize::from(f.await.unwrap().0)] += 1;
        }
    }
    count
}

fn active(server: usize) -> String {
    format!("lb_backend_active_sessions{{backend=\"pool\",server=\"s{server}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundrobin_follows_the_weights() {
    let lb = LbBuilder::new(&named(2).await).weights(&[3, 1]).spawn();
    let count = spread(lb.listener, 2, 4000, 16).await;
    // 3:1 of 4,000 within ±2 % of the flows.
    assert!(count[0].abs_diff(3000) <= 80, "{count:?}");
    assert!(count[1].abs_diff(1000) <= 80, "{count:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leastconn_sends_new_flows_to_the_idle_server() {
    let lb = LbBuilder::new(&named(2).await).balance("leastconn").spawn();
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(flow(lb.listener, None).await);
    }
    let on = |id| held.iter().filter(|(s, _)| *s == id).count();
    assert_eq!((on(0), on(1)), (5, 5));
    // Server 0's flows end; server 1 keeps its five.
    held.retain(|(id, _)| *id == 1);
    let m = lb
        .wait_for("server 0's sessions to end", |m| m.get(&active(0)) == 0.0)
        .await;
    assert_eq!(m.get(&active(1)), 5.0);
    // Each new flow goes to the less busy server: all four to server 0 (4 against 5).
    for _ in 0..4 {
        let (id, s) = flow(lb.listener, None).await;
        assert_eq!(id, 0);
        held.push((id, s));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_keeps_each_client_on_one_server() {
    let lb = LbBuilder::new(&named(3).await).balance("source").spawn();
    let mut seen = [0usize; 3];
    // Twenty clients, each from its own loopback address, three flows each.
    for client in 2..22u8 {
        let ip = Ipv4Addr::new(127, 0, 0, client);
        let (first, _) = flow(lb.listener, Some(ip)).await;
        for _ in 0..2 {
            assert_eq!(flow(lb.listener, Some(ip)).await.0, first, "client {ip}");
        }
        seen[usize::from(first)] += 1;
    }
    // Spread over the servers, not all on one.
    assert!(seen.iter().filter(|&&n| n > 0).count() >= 2, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_evenly_and_avoids_a_loaded_server() {
    let lb = LbBuilder::new(&named(3).await).balance("random").spawn();
    let count = spread(lb.listener, 3, 1500, 1).await;
    // 500 each expected (two draws, then the idler: as even as one draw on idle servers).
    for n in &count {
        assert!(n.abs_diff(500) <= 100, "{count:?}");
    }
    // Load server 0: thirty held flows spread over the three, then only server 0's kept.
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(flow(lb.listener, None).await);
    }
    held.retain(|(id, _)| *id == 0);
    let on_0 = held.len() as f64;
    assert!(on_0 >= 5.0, "server 0 got {on_0} of 30 held flows");
    lb.wait_for("only server 0's flows held", |m| {
        m.get(&active(0)) == on_0 && m.get(&active(1)) == 0.0 && m.get(&active(2)) == 0.0
    })
    .await;
    // Every draw that includes it has an idler other candidate.
    let count = spread(lb.listener, 3, 300, 1).await;
    assert_eq!(count[0], 0, "{count:?}");
}

#[tokio::test]
async fn uri_sends_each_path_to_one_server() {
    let mut apps = Vec::new();
    for name in ["a0", "a1", "a2"] {
        apps.push(Reflector::start(name).await);
    }
    let addrs: Vec<SocketAddr> = apps.iter().map(|a| a.addr).collect();
    let lb = HttpLbBuilder::new(&addrs).app_yaml("    balance: uri\n").spawn();
    let addr = lb.listener;
    let server_of = |path: String| async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        timeout(Duration::from_secs(10), c.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let body = text.split_once("\r\n\r\n").expect("a response").1;
        body[..2].to_string()
    };
    let mut used = std::collections::HashSet::new();
    for i in 0..30 {
        let first = server_of(format!("/item/{i}")).await;
        // The query is not part of the key; the path is.
        assert_eq!(server_of(format!("/item/{i}?page=2")).await, first);
        assert_eq!(server_of(format!("/item/{i}")).await, first);
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "{used:?}");
}
