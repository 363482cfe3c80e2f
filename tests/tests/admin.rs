//! Runtime administration: the real `lb stats` and `lb server ...` commands against a running
//! lb's admin endpoint. Changes take effect at once, for new flows only.
use lb_tests::{
    bpf_available,
    http::{read_response, HttpLbBuilder, Reflector},
    lb::{lb_binary, spawn_command, Lb, LbBuilder},
    python_module_available, servers, DEBIAN_PYTHON,
};
use std::{
    collections::{HashMap, HashSet},
    process::Output,
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// Runs `lb ARGS --admin ADDR` (bounded at 30 s).
async fn lb_cmd(lb: &Lb, args: &[&str]) -> Output {
    let admin = lb.admin.to_string();
    let run = tokio::process::Command::new(lb_binary())
        .args(args)
        .args(["--admin", &admin])
        .env_remove("LB_ADMIN_TOKEN")
        .output();
    timeout(Duration::from_secs(30), run)
        .await
        .expect("lb command timed out")
        .expect("cannot run lb")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A flow through lb: the id of the server it reached, and the flow.
async fn flow(lb: &Lb) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(lb.listener).await.unwrap();
    let mut id = [0u8; 1];
    timeout(Duration::from_secs(10), s.read_exact(&mut id))
        .await
        .expect("no server id within 10 s")
        .unwrap();
    (id[0], s)
}

/// Sends `n` bytes of a pattern on an echoing flow and checks they all come back, in order.
async fn echo_intact(s: &mut TcpStream, n: usize) {
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
    };
    let receive = async {
        let mut back = vec![0u8; n];
        timeout(Duration::from_secs(30), r.read_exact(&mut back))
            .await
            .expect("echo timed out")
            .unwrap();
        back
    };
    let ((), back) = tokio::join!(send, receive);
    assert!(back == data, "the echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_kernel_flows_finish_and_sends_no_new_ones() {
    if !bpf_available("drain_lets_kernel_flows_finish_and_sends_no_new_ones") {
        return;
    }
    let (s0, s1) = (servers::named(0).await, servers::named(1).await);
    // Every flow goes to the kernel at once.
    let lb = LbBuilder::new(&[s0, s1])
        .forwarding("kernel")
        .offload_after("0")
        .spawn();
    let (a, mut on_0) = flow(&lb).await;
    let (b, _on_1) = flow(&lb).await;
    assert_eq!((a, b), (0, 1));
    echo_intact(&mut on_0, 64 << 10).await;

    let out = stdout(&lb_cmd(&lb, &["server", "drain", "pool/s0"]).await);
    assert!(out.contains("pool/s0: DRAIN"), "{out}");
    for _ in 0..10 {
        assert_eq!(flow(&lb).await.0, 1, "a new flow went to the draining server");
    }
    // The flow already on it goes on, through the kernel, intact.
    echo_intact(&mut on_0, 4 << 20).await;
    let m = lb.metrics();
    assert!(m.kernel_bytes() >= (8 << 20) as f64, "{}", m.text);
    assert_eq!(
        m.get("lb_backend_active_sessions{backend=\"pool\",server=\"s0\"}"),
        1.0
    );
    let state = |s: &str| format!("lb_server_state{{backend=\"pool\",server=\"s0\",state=\"{s}\"}}");
    assert_eq!((m.get(&state("DRAIN")), m.get(&state("UP"))), (1.0, 0.0));
    let stats = stdout(&lb_cmd(&lb, &["stats"]).await);
    assert!(stats.contains("DRAIN"), "{stats}");

    // Back: new flows reach it again.
    stdout(&lb_cmd(&lb, &["server", "enable", "pool/s0"]).await);
    let mut seen = [0; 2];
    for _ in 0..10 {
        seen[usize::from(flow(&lb).await.0)] += 1;
    }
    assert!(seen[0] >= 4, "{seen:?}");
}

/// `lb stats --json`: the `bytes_kernel` of `pool/s0`.
async fn kernel_bytes_of_s0(lb: &Lb) -> u64 {
    let json = stdout(&lb_cmd(lb, &["stats", "--json"]).await);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["backends"][0]["servers"][0]["bytes_kernel"]
        .as_u64()
        .unwrap_or_else(|| panic!("no bytes_kernel: {json}"))
}

/// A server's kernel bytes grow while its flow runs in the kernel (the program's per-socket
/// counts, read at each snapshot and scrape), and the flow's end adds only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_bytes_of_a_live_flow_are_counted_as_they_go() {
    if !bpf_available("kernel_bytes_of_a_live_flow_are_counted_as_they_go") {
        return;
    }
    let echo = servers::echo().await;
    let lb = LbBuilder::new(&[echo])
        .forwarding("kernel")
        .offload_after("0")
        .spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    lb.wait_for("the flow to be in the kernel", |m| {
        m.get("lb_kernel_flows") == 1.0
    })
    .await;
    // Out and back: each byte crosses the kernel twice.
    const N: usize = 1 << 20;
    echo_intact(&mut c, N).await;
    let live = kernel_bytes_of_s0(&lb).await;
    assert!(live >= 2 * N as u64, "{live} kernel bytes while the flow is open");
    let server = "lb_server_forwarded_bytes_total{backend=\"pool\",server=\"s0\",path=\"kernel\"}";
    let m = lb.metrics();
    assert!(m.get(server) >= (2 * N) as f64, "{}", m.text);
    assert_eq!(m.get("lb_kernel_flows"), 1.0, "the flow is still open");
    echo_intact(&mut c, N).await;
    assert!(kernel_bytes_of_s0(&lb).await >= 4 * N as u64);
    // Its end: counted once. One flow, one server: the server's total is the kernel's.
    drop(c);
    let m = lb
        .wait_for("the flow's end", |m| m.get("lb_kernel_flows") == 0.0)
        .await;
    assert_eq!(m.get(server), m.kernel_bytes(), "{}", m.text);
    assert_eq!(kernel_bytes_of_s0(&lb).await as f64, m.kernel_bytes());
}

#[tokio::test]
async fn weight_and_disable_apply_to_the_next_flow() {
    let (s0, s1) = (servers::named(0).await, servers::named(1).await);
    let lb = LbBuilder::new(&[s0, s1]).spawn();
    let out = stdout(&lb_cmd(&lb, &["server", "weight", "pool/s1", "0"]).await);
    assert!(out.contains("pool/s1: DRAIN (weight 0"), "{out}");
    for _ in 0..6 {
        assert_eq!(flow(&lb).await.0, 0);
    }
    stdout(&lb_cmd(&lb, &["server", "weight", "pool/s1", "3"]).await);
    let out = stdout(&lb_cmd(&lb, &["server", "disable", "pool/s0"]).await);
    assert!(out.contains("pool/s0: MAINT"), "{out}");
    for _ in 0..6 {
        assert_eq!(flow(&lb).await.0, 1);
    }
    // Both out: a TCP client is closed, and that is counted.
    stdout(&lb_cmd(&lb, &["server", "disable", "pool/s1"]).await);
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    let mut rest = Vec::new();
    let _ = timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("lb kept the client");
    assert!(rest.is_empty());
    lb.wait_for("the unserved session", |m| {
        m.counted("lb_backend_unserved_total{backend=\"pool\",reason=\"no_server\"}") == 1.0
    })
    .await;

    let json = stdout(&lb_cmd(&lb, &["stats", "--json"]).await);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let servers = &v["backends"][0]["servers"];
    assert_eq!(servers[0]["state"], "MAINT");
    assert_eq!(servers[1]["weight"], 3);
    assert_eq!(v["listeners"][0]["name"], "test");
    // The process, as HAProxy's `show info` tells it: this lb's pid, no reload yet.
    assert_eq!(v["process"]["pid"], lb.pid());
    assert!(v["process"]["started"].as_str().unwrap().ends_with('Z'), "{json}");
    assert!(v["process"]["last_reload"].is_null(), "{json}");
    // A name lb does not have, and a weight out of range: refused with the reason.
    let wrong = lb_cmd(&lb, &["server", "drain", "pool/nope"]).await;
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("backend `pool` has no server `nope`"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    let wrong = lb_cmd(&lb, &["server", "weight", "pool/s0", "999"]).await;
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("expected a number from 0 to 256"));
}

/// `GET path` on the admin endpoint: the body of a 200 answer.
async fn admin_get(lb: &Lb, path: &str) -> String {
    let mut c = TcpStream::connect(lb.admin).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        lb.admin
    );
    c.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .expect("the admin endpoint did not answer within 10 s")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// A healthy server set to weight 0 takes no new flows: `lb stats`, the stats page and the
/// metrics show it DRAIN with its weight 0, as HAProxy does; a weight back makes it UP.
#[tokio::test]
async fn a_server_of_weight_0_is_shown_drain() {
    let (s0, s1) = (servers::named(0).await, servers::named(1).await);
    let lb = LbBuilder::new(&[s0, s1]).spawn();
    let out = stdout(&lb_cmd(&lb, &["server", "weight", "pool/s1", "0"]).await);
    assert!(out.contains("pool/s1: DRAIN (weight 0, "), "{out}");
    // `lb stats`: the server's row, by column.
    let stats = stdout(&lb_cmd(&lb, &["stats"]).await);
    let row = |name: &str| -> Vec<String> {
        stats
            .lines()
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .find(|w| w.first().map(String::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stats}"))
    };
    // SERVER ADDRESS STATE WEIGHT ...
    assert_eq!(row("s1")[2..4], ["DRAIN", "0"], "{stats}");
    assert_eq!(row("s0")[2..4], ["UP", "1"], "{stats}");
    // The stats page: the row's class (its colour) and its state cell.
    let page = admin_get(&lb, "/stats").await;
    assert!(
        page.contains("<tr class=\"DRAIN\" data-server=\"s1\">")
            && page.contains("<td class=\"state\">DRAIN</td><td class=\"name\">-</td><td>0</td>"),
        "{page}"
    );
    let m = lb.metrics();
    let state = |s: &str| format!("lb_server_state{{backend=\"pool\",server=\"s1\",state=\"{s}\"}}");
    assert_eq!((m.get(&state("DRAIN")), m.get(&state("UP"))), (1.0, 0.0));
    // A weight again: UP.
    let out = stdout(&lb_cmd(&lb, &["server", "weight", "pool/s1", "2"]).await);
    assert!(out.contains("pool/s1: UP (weight 2, "), "{out}");
    let page = admin_get(&lb, "/stats").await;
    assert!(page.contains("<tr class=\"UP\" data-server=\"s1\">"), "{page}");
}

#[tokio::test]
async fn with_a_token_every_request_must_carry_it() {
    let s0 = servers::named(0).await;
    let token = "s3cret-token-0123456789";
    let lb = LbBuilder::new(&[s0]).admin_token(token).spawn();
    let refused = lb_cmd(&lb, &["stats"]).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let out = stdout(&lb_cmd(&lb, &["stats", "--token", token]).await);
    assert!(out.contains("s0"), "{out}");
    // A wrong one is no better than none.
    let wrong = lb_cmd(
        &lb,
        &["server", "drain", "pool/s0", "--token", "s3cret-token-0123456780"],
    )
    .await;
    assert!(!wrong.status.success());
    // Not even metrics without it.
    let mut c = TcpStream::connect(lb.admin).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// One request on `c`, kept alive; the reflecting server's name (the body's first word).
async fn served_by(c: &mut TcpStream) -> String {
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let text = read_response(c).await;
    let body = text.split_once("\r\n\r\n").unwrap().1;
    body.split(' ').next().unwrap().to_string()
}

#[tokio::test]
async fn a_drained_server_gets_no_more_requests_from_kept_alive_clients() {
    let (web1, web2) = (Reflector::start("web1").await, Reflector::start("web2").await);
    let lb = HttpLbBuilder::new(&[web1.addr, web2.addr]).spawn();
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    assert_eq!(served_by(&mut c).await, "web1");
    assert_eq!(served_by(&mut c).await, "web1", "the server connection is kept");
    stdout(&lb_cmd(&lb, &["server", "drain", "app/s0"]).await);
    // Same client connection: the next request goes to a server that takes new flows.
    assert_eq!(served_by(&mut c).await, "web2");
}

#[tokio::test]
async fn commands_from_other_web_sites_and_rebound_names_are_refused() {
    let s0 = servers::named(0).await;
    let lb = LbBuilder::new(&[s0]).spawn();
    let raw = |request: String| async move {
        let mut c = TcpStream::connect(lb.admin).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let admin = lb.admin;
    // A page on another site posting a form to the loopback endpoint.
    let answer = raw(format!(
        "POST /servers/pool/s0/disable HTTP/1.1\r\nHost: {admin}\r\nOrigin: https://evil.example\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(flow(&lb).await.0, 0, "the server was disabled anyway");
    // A name that resolves to 127.0.0.1 (DNS rebinding).
    let answer = raw(format!(
        "GET /stats.json HTTP/1.1\r\nHost: evil.example:{}\r\nConnection: close\r\n\r\n",
        admin.port()
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

/// Names with every character besides letters and digits that a name may have (HAProxy's
/// rule): they reach every label value of the scrape.
const LISTENER: &str = "web-1.prod:443_a";
const BACKEND: &str = "app.v2:blue-green_1";
const SERVER: &str = "s-1.a:b_c";

/// Parses an OpenMetrics text (stdin) with the reference parser, Python's prometheus_client, and
/// prints each sample as a JSON line: [name, labels, value].
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(json.dumps([s.name, s.labels, s.value]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_scrape_parses_with_prometheus_client() {
    if !python_module_available(
        "the_metrics_scrape_parses_with_prometheus_client",
        "prometheus_client",
    ) {
        return;
    }
    let (echo, other) = (servers::echo().await, servers::named(1).await);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lb.yaml");
    std::fs::write(
        &config,
        format!(
            "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: '{LISTENER}'\n    bind: 127.0.0.1:0\n    backend: '{BACKEND}'\n\
             backends:\n  - name: '{BACKEND}'\n    servers:\n      - {{ name: '{SERVER}', address: \"{echo}\" }}\n\
             \x20     - {{ name: s2, address: \"{other}\", weight: 0 }}\n"
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(lb_binary());
    cmd.args(["run", "-c"]).arg(&config);
    let lb = spawn_command(cmd, dir).unwrap_or_else(|e| panic!("lb did not start: {e}"));
    // A flow, so that the per-listener and per-server series exist.
    let mut c = TcpStream::connect(lb.listener).await.unwrap();
    echo_intact(&mut c, 4096).await;
    drop(c);
    lb.wait_for("the flow's end", |m| m.sum("lb_active_connections") == 0.0)
        .await;
    let text = lb.metrics().text;

    let mut python = tokio::process::Command::new(DEBIAN_PYTHON)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run python3");
    let mut stdin = python.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = timeout(Duration::from_secs(30), python.wait_with_output())
        .await
        .expect("the parser timed out")
        .unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, HashMap<String, String>, f64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The parser saw every sample line, each whole.
    let lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    assert_eq!(samples.len(), lines, "{text}");
    // Each name came back as it is in the configuration.
    let values = |label: &str| {
        samples
            .iter()
            .filter_map(|(_, labels, _)| labels.get(label).cloned())
            .collect::<HashSet<String>>()
    };
    assert_eq!(values("listener"), HashSet::from([LISTENER.to_string()]));
    assert_eq!(values("backend"), HashSet::from([BACKEND.to_string()]));
    assert_eq!(
        values("server"),
        HashSet::from([SERVER.to_string(), "s2".to_string()])
    );
    // The runtime API takes such names, in its command and in the endpoint's URL.
    let out = stdout(&lb_cmd(&lb, &["server", "drain", &format!("{BACKEND}/{SERVER}")]).await);
    assert!(out.contains(&format!("{BACKEND}/{SERVER}: DRAIN")), "{out}");
    let value = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    };
    assert_eq!(value("lb_connections_total", &[("listener", LISTENER)]), 1.0);
    assert_eq!(
        value(
            "lb_server_state",
            &[("backend", BACKEND), ("server", "s2"), ("state", "DRAIN")]
        ),
        1.0,
        "a server of weight 0 is DRAIN"
    );
}
