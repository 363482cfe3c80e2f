//! The PROXY protocol with peers no code of ours wrote: HAProxy introducing its clients to lb
//! (`send-proxy`, `send-proxy-v2`), lb introducing its clients to HAProxy (`accept-proxy`) and
//! to nginx (`listen ... proxy_protocol`), each checked by the client address the far end
//! reports; and headers lb must refuse before any server is chosen.
//!
//! Clients connect from 127.0.0.2 or 127.0.0.3 (all of 127/8 is loopback), while lb and the
//! peers talk from 127.0.0.1: an address the far end reports can only be the client's if the
//! header carried it.
use lb_tests::{
    bpf_available,
    daemons::Daemon,
    http::{HttpLbBuilder, Reflector},
    lb::LbBuilder,
    program_available, servers,
};
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

const HAPROXY_DEFAULTS: &str =
    "global\n  maxconn 256\ndefaults\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n";

/// A connection to `addr` from `source` (a loopback address other than 127.0.0.1).
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// An HTTP/1.1 GET of `path` on a new connection from `source`; the whole answer (at most
/// 10 s).
async fn get_from(source: &str, addr: SocketAddr, path: &str) -> String {
    let mut s = connect_from(source, addr).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// HAProxy in front of lb, in TCP mode, introducing its clients with `send-proxy` or
/// `send-proxy-v2`.
fn haproxy_in_front_of(lb: SocketAddr, option: &str) -> Daemon {
    Daemon::haproxy(&format!(
        "{HAPROXY_DEFAULTS}listen front\n  mode tcp\n  bind 127.0.0.1:{{PORT}}\n  server lb {lb} {option}\n"
    ))
}

/// HAProxy behind lb: takes PROXY headers (`accept-proxy`) and answers each request with the
/// client address and port it was told, and the authority TLV.
fn haproxy_reporting_clients() -> Daemon {
    Daemon::haproxy(&format!(
        "{HAPROXY_DEFAULTS}frontend far\n  mode http\n  bind 127.0.0.1:{{PORT}} accept-proxy\n  \
         http-request return status 200 content-type text/plain lf-string \"client=%[src] authority=%[fc_pp_authority]\\n\"\n"
    ))
}

/// nginx behind lb: takes PROXY headers and answers `/` with the client address it was told;
/// `/big` is a 4 MiB file.
fn nginx_reporting_clients() -> Daemon {
    let nginx = Daemon::nginx(
        "  server {\n    listen 127.0.0.1:{PORT} proxy_protocol;\n    \
         location = / { return 200 \"client=$proxy_protocol_addr\\n\"; }\n    \
         location = /big { add_header X-Client $proxy_protocol_addr; alias {DIR}/big; }\n  }",
    );
    std::fs::write(nginx.dir().join("big"), vec![b'z'; 4 << 20]).unwrap();
    nginx
}

fn peers_available(test: &str) -> bool {
    program_available(test, "haproxy") && program_available(test, "nginx")
}

/// HAProxy sends v1 and v2 headers to an HTTP listener of lb, which passes the client's
/// address on in X-Forwarded-For and logs it; a TCP listener balancing by source picks by it.
#[tokio::test]
async fn haproxy_introduces_its_clients_to_lb() {
    if !peers_available("haproxy_introduces_its_clients_to_lb") {
        return;
    }
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .listener_yaml("    accept_proxy: [127.0.0.1/32]\n")
        .spawn();
    for option in ["send-proxy", "send-proxy-v2"] {
        let front = haproxy_in_front_of(lb.listener, option);
        let answer = get_from("127.0.0.2", front.addr, "/who").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{option}: {answer}");
        assert!(
            answer.contains("x-forwarded-for: 127.0.0.2\n"),
            "{option}: {answer}\n{}",
            lb.log()
        );
    }
    let logged = lb
        .log()
        .lines()
        .filter(|l| l.contains("lb::access") && l.contains(" 127.0.0.2:") && l.contains("/who"))
        .count();
    assert_eq!(logged, 2, "the access log names the client:\n{}", lb.log());
    let m = lb.metrics();
    assert_eq!(m.sum("lb_proxy_header_refused_total"), 0.0, "{}", m.text);
    // HTTPS: the header comes before the ClientHello.
    let lb = HttpLbBuilder::new(&[app.addr])
        .tls(true)
        .listener_yaml("    accept_proxy: [127.0.0.1/32]\n")
        .spawn();
    let front = haproxy_in_front_of(lb.listener, "send-proxy-v2");
    let tls = lb.tls.as_ref().unwrap();
    let url = format!("https://{}:{}/who", tls.name, front.addr.port());
    let resolve = format!("{}:{}:127.0.0.1", tls.name, front.addr.port());
    let ca = tls.ca.display().to_string();
    let args = [
        "-s",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "--interface",
        "127.0.0.2",
        &url,
    ];
    let answer = lb_tests::http::run_tool("curl", &args).await;
    assert!(
        answer.contains("x-forwarded-for: 127.0.0.2\n"),
        "{answer}\n{}",
        lb.log()
    );
}

/// `balance: source` hashes the address the header carried: one real peer (HAProxy's
/// address) introducing many clients spreads them over both servers, and each client keeps
/// its server.
#[tokio::test]
async fn balancing_by_source_uses_the_carried_address() {
    let servers = [servers::named(0).await, servers::named(1).await];
    let lb = LbBuilder::new(&servers)
        .balance("source")
        .listener_yaml("    accept_proxy: true\n")
        .spawn();
    let mut picked = Vec::new();
    for round in 0..2 {
        for client in 1..=16u8 {
            let mut s = TcpStream::connect(lb.listener).await.unwrap();
            let header = format!("PROXY TCP4 192.0.2.{client} 192.0.2.200 4000{round} 80\r\n");
            s.write_all(header.as_bytes()).await.unwrap();
            let mut id = [0u8; 1];
            s.read_exact(&mut id).await.unwrap();
            picked.push((round, client, id[0]));
        }
    }
    let server_of = |round, client| picked.iter().find(|p| p.0 == round && p.1 == client).unwrap().2;
    for client in 1..=16u8 {
        assert_eq!(
            server_of(0, client),
            server_of(1, client),
            "client {client} moved: {picked:?}"
        );
    }
    let first = picked.iter().filter(|p| p.2 == 0).count();
    assert!(
        first > 0 && first < picked.len(),
        "one server took every client: {picked:?}"
    );
}

/// lb sends v1 and v2 headers, from TCP and HTTP listeners, to HAProxy (`accept-proxy`) and
/// to nginx (`proxy_protocol`), which report the client's address; and passes on the address
/// a received header carried (HAProxy → lb → nginx).
#[tokio::test]
async fn lb_introduces_its_clients_to_haproxy_and_nginx() {
    if !peers_available("lb_introduces_its_clients_to_haproxy_and_nginx") {
        return;
    }
    let far = [haproxy_reporting_clients(), nginx_reporting_clients()];
    for peer in &far {
        for version in ["v1", "v2"] {
            let send = format!("    send_proxy: {version}\n");
            let tcp = LbBuilder::new(&[peer.addr]).backend_yaml(&send).spawn();
            let app = std::slice::from_ref(&peer.addr);
            let http = HttpLbBuilder::new(app).backend_yaml("app", &send).spawn();
            for (mode, lb) in [("tcp", &tcp), ("http", &http)] {
                let answer = get_from("127.0.0.3", lb.listener, "/").await;
                assert!(
                    answer.contains("client=127.0.0.3"),
                    "{mode} listener, send_proxy {version}, to {}: {answer}\n{}\n{}",
                    peer.log().lines().next().unwrap_or_default(),
                    peer.log(),
                    lb.log()
                );
            }
        }
    }
    // A header received is passed on: HAProxy → lb (accept_proxy, send_proxy) → nginx.
    let lb = LbBuilder::new(&[far[1].addr])
        .listener_yaml("    accept_proxy: [127.0.0.1/32]\n")
        .backend_yaml("    send_proxy: v1\n")
        .spawn();
    let front = haproxy_in_front_of(lb.listener, "send-proxy-v2");
    let answer = get_from("127.0.0.2", front.addr, "/").await;
    assert!(answer.contains("client=127.0.0.2"), "{answer}\n{}", far[1].log());
}

/// Where lb terminated TLS, its v2 header carries the name the client asked for (SNI, as
/// HAProxy's `fc_pp_authority` reads it) and the protocol agreed in ALPN.
#[tokio::test]
async fn a_v2_header_carries_the_tls_name_and_alpn() {
    if !peers_available("a_v2_header_carries_the_tls_name_and_alpn") {
        return;
    }
    let far = haproxy_reporting_clients();
    let lb = HttpLbBuilder::new(&[far.addr])
        .tls(true)
        .backend_yaml("app", "    send_proxy: v2\n")
        .spawn();
    let (url, args) = lb.url("/");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["-s", "--http1.1", "--interface", "127.0.0.3", &url]);
    let answer = lb_tests::http::run_tool("curl", &args).await;
    assert_eq!(answer, "client=127.0.0.3 authority=lb.test\n");
    // The ALPN TLV, read by the ppp crate at a server of the test's.
    let (addr, header) = one_header_server().await;
    let lb = HttpLbBuilder::new(&[addr])
        .tls(true)
        .backend_yaml("app", "    send_proxy: v2\n")
        .spawn();
    let (url, args) = lb.url("/");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["-s", "--http1.1", "-m", "10", &url]);
    let _ = tokio::process::Command::new("curl").args(&args).output().await;
    let header = tokio::time::timeout(Duration::from_secs(10), header)
        .await
        .expect("a header within 10 s")
        .unwrap();
    let parsed = ppp::v2::Header::try_from(&header[..]).expect("a v2 header");
    let tlvs: Vec<(u8, Vec<u8>)> = parsed
        .tlvs()
        .map(|t| t.unwrap())
        .map(|t| (t.kind, t.value.to_vec()))
        .collect();
    assert!(tlvs.contains(&(0x01, b"http/1.1".to_vec())), "{tlvs:?}");
    assert!(tlvs.contains(&(0x02, b"lb.test".to_vec())), "{tlvs:?}");
}

/// A server that reads one connection's v2 header (16 bytes and its length) and answers 200.
async fn one_header_server() -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let l = servers::listener();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut header = vec![0u8; 16];
        s.read_exact(&mut header).await.unwrap();
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        header.resize(16 + len, 0);
        s.read_exact(&mut header[16..]).await.unwrap();
        let _ = tx.send(header);
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    });
    (addr, rx)
}

/// A flow that goes to the kernel at once (`offload_after: 0`) starts with the header all the
/// same: nginx sees the client and sends 4 MiB back, which the kernel forwards.
#[tokio::test]
async fn kernel_flows_start_with_the_header() {
    if !peers_available("kernel_flows_start_with_the_header")
        || !bpf_available("kernel_flows_start_with_the_header")
    {
        return;
    }
    let far = nginx_reporting_clients();
    let lb = LbBuilder::new(&[far.addr])
        .forwarding("kernel")
        .offload_after("0")
        .backend_yaml("    send_proxy: v2\n")
        .spawn();
    let answer = get_from("127.0.0.3", lb.listener, "/big").await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
    assert!(
        head.to_ascii_lowercase().contains("x-client: 127.0.0.3"),
        "{head}"
    );
    assert_eq!(body.len(), 4 << 20);
    let m = lb
        .wait_for("the flow's end", |m| m.sum("lb_active_connections") == 0.0)
        .await;
    assert!(m.kernel_bytes() > 0.0, "{}", m.text);
}

/// Health checks of servers that expect a header send one (v1 UNKNOWN, v2 LOCAL): nginx,
/// which refuses a connection without one, answers them; without `send_proxy` the same check
/// fails and takes the server down.
#[tokio::test]
async fn health_checks_send_the_header_too() {
    if !peers_available("health_checks_send_the_header_too") {
        return;
    }
    let far = nginx_reporting_clients();
    let answered = || {
        std::fs::read_to_string(far.dir().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET / HTTP/1.1\" 200"))
            .count()
    };
    for (send, passes) in [("v1", true), ("v2", true), ("off", false)] {
        let before = answered();
        let lb = LbBuilder::new(&[far.addr])
            .backend_yaml(&format!(
                "    send_proxy: {send}\n    health_check: {{ kind: http, interval: 100ms, rise: 1, fall: 1 }}\n"
            ))
            .spawn();
        let up = "lb_server_up{backend=\"pool\",server=\"s0\"}";
        let failures = "lb_health_check_failures_total{backend=\"pool\",server=\"s0\"}";
        if passes {
            let mut checks = 0;
            for _ in 0..250 {
                checks = answered() - before;
                if checks >= 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                checks >= 3,
                "send_proxy {send}: nginx answered {checks} checks\n{}",
                far.log()
            );
            let m = lb.metrics();
            assert_eq!(
                (m.get(up), m.get(failures)),
                (1.0, 0.0),
                "send_proxy {send}:\n{}",
                m.text
            );
        } else {
            lb.wait_for("the server down", |m| m.get(up) == 0.0 && m.get(failures) >= 1.0)
                .await;
            assert_eq!(answered(), before);
        }
    }
}

/// Bad headers are refused, each counted by its reason, and nothing reaches the server.
#[tokio::test]
async fn bad_headers_never_reach_a_server() {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .listener_yaml("    accept_proxy: true\n    timeouts: { client: 2s }\n")
        .spawn();
    let mut v2_unknown_version = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2_unknown_version.extend_from_slice(&[0x31, 0x11, 0x00, 0x0c]);
    v2_unknown_version.extend_from_slice(&[127, 0, 0, 2, 127, 0, 0, 1, 0, 80, 0, 80]);
    let mut v2_oversized = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2_oversized.extend_from_slice(&[0x21, 0x11, 0xff, 0xf0]);
    v2_oversized.extend_from_slice(&[0u8; 512]);
    let mut v1_oversized = b"PROXY TCP4 127.0.0.2 127.0.0.1 ".to_vec();
    v1_oversized.resize(200, b'9');
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
    let with_request = |header: &[u8]| [header, &request[..]].concat();
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        // (what, bytes, close after them, reason)
        (
            "truncated v1",
            b"PROXY TCP4 127.0.0.2 127.0".to_vec(),
            true,
            "closed",
        ),
        (
            "truncated v2",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f".to_vec(),
            true,
            "closed",
        ),
        ("no header", request.clone(), false, "missing"),
        (
            "wrong signature",
            with_request(b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x00"),
            false,
            "missing",
        ),
        (
            "unknown version",
            with_request(&v2_unknown_version),
            false,
            "malformed",
        ),
        (
            "v1 with LF only",
            with_request(b"PROXY TCP4 127.0.0.2 127.0.0.1 1 80\n"),
            false,
            "malformed",
        ),
        ("v1 oversized", v1_oversized, false, "too_long"),
        ("v2 oversized", v2_oversized, false, "too_long"),
    ];
    let mut counted: std::collections::HashMap<&str, f64> = Default::default();
    for (what, bytes, close, reason) in &cases {
        let mut s = TcpStream::connect(lb.listener).await.unwrap();
        s.write_all(bytes).await.unwrap();
        if *close {
            s.shutdown().await.unwrap();
        }
        let answer = read_until_closed(&mut s).await;
        assert!(answer.is_empty(), "{what}: answered {answer:?}");
        // Counted under its reason, and under no other.
        *counted.entry(reason).or_default() += 1.0;
        let total: f64 = counted.values().sum();
        let m = lb
            .wait_for(what, |m| m.sum("lb_proxy_header_refused_total") == total)
            .await;
        for (r, n) in &counted {
            let series = format!("lb_proxy_header_refused_total{{listener=\"web\",reason=\"{r}\"}}");
            assert_eq!(m.get(&series), *n, "{what}:\n{}", m.text);
        }
    }
    // One byte a second: closed at timeouts.client (2 s), the header never whole.
    let mut s = TcpStream::connect(lb.listener).await.unwrap();
    let started = Instant::now();
    let mut refused_after = None;
    for byte in b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 80\r\n" {
        if s.write_all(&[*byte]).await.is_err() || peer_closed(&mut s).await {
            refused_after = Some(started.elapsed());
            break;
        }
    }
    let refused_after = refused_after.expect("lb kept a connection sending one byte a second");
    assert!(
        refused_after >= Duration::from_millis(1900) && refused_after < Duration::from_secs(5),
        "{refused_after:?}"
    );
    let m = lb
        .wait_for("the timeout", |m| {
            m.get("lb_proxy_header_refused_total{listener=\"web\",reason=\"timeout\"}") == 1.0
        })
        .await;
    assert_eq!(app.connections(), 0, "{}", m.text);
    assert_eq!(m.sum("lb_http_requests_total"), 0.0, "{}", m.text);
}

/// What a header may carry besides an IPv4 address: a v2 LOCAL header (a front load
/// balancer's own check) and a v1 UNKNOWN line leave the connection's address; an
/// IPv4-mapped IPv6 address (a dual-stack front) is the IPv4 client; an SSL TLV (the client
/// came over TLS) makes the scheme `https`.
#[tokio::test]
async fn local_unknown_mapped_and_ssl_headers() {
    use ppp::v2::{Addresses, Builder, Command, Protocol, Version};
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .listener_yaml("    accept_proxy: true\n")
        .spawn();
    let request = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let v2 = |command: Command, addresses: Addresses, ssl: bool| {
        let mut b = Builder::with_addresses(Version::Two | command, Protocol::Stream, addresses);
        if ssl {
            b = b.write_tlv(0x20, &[0x01, 0, 0, 0, 0][..]).unwrap();
        }
        b.build().unwrap()
    };
    let pair = |a: &str, b: &str| {
        Addresses::from((a.parse::<SocketAddr>().unwrap(), b.parse::<SocketAddr>().unwrap()))
    };
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        // (what, header, X-Forwarded-For, X-Forwarded-Proto)
        (
            "v2 LOCAL",
            v2(Command::Local, Addresses::Unspecified, false),
            "127.0.0.3",
            "http",
        ),
        ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec(), "127.0.0.3", "http"),
        (
            "v1 mapped",
            b"PROXY TCP6 ::ffff:192.0.2.5 ::ffff:192.0.2.9 4000 80\r\n".to_vec(),
            "192.0.2.5",
            "http",
        ),
        (
            "v2 SSL",
            v2(Command::Proxy, pair("192.0.2.6:4000", "192.0.2.9:443"), true),
            "192.0.2.6",
            "https",
        ),
    ];
    for (what, header, xff, proto) in cases {
        let mut s = connect_from("127.0.0.3", lb.listener).await;
        s.write_all(&[&header[..], &request[..]].concat()).await.unwrap();
        let answer = read_until_closed(&mut s).await;
        assert!(
            answer.contains(&format!("x-forwarded-for: {xff}\n")),
            "{what}: {answer}"
        );
        assert!(
            answer.contains(&format!("x-forwarded-proto: {proto}\n")),
            "{what}: {answer}"
        );
    }
}

/// A header from an address `accept_proxy` does not list is refused unread.
#[tokio::test]
async fn a_header_from_an_untrusted_source_is_refused() {
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .listener_yaml("    accept_proxy: [10.0.0.0/8, 127.0.0.2]\n")
        .spawn();
    let header =
        b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 80\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let mut s = connect_from("127.0.0.3", lb.listener).await;
    s.write_all(header).await.unwrap();
    assert_eq!(read_until_closed(&mut s).await, "");
    let mut trusted = connect_from("127.0.0.2", lb.listener).await;
    trusted.write_all(header).await.unwrap();
    let answer = read_until_closed(&mut trusted).await;
    assert!(answer.contains("x-forwarded-for: 192.0.2.1\n"), "{answer}");
    let m = lb.metrics();
    assert_eq!(
        m.get("lb_proxy_header_refused_total{listener=\"web\",reason=\"untrusted\"}"),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(app.connections(), 1);
}

/// Reads until the peer closes (at most 10 s); what came, as text.
async fn read_until_closed(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "not closed within 10 s; got {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits up to a second for the peer to close; whether it did.
async fn peer_closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}
