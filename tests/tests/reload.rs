//! Whole-configuration reloads: `lb reload` and SIGHUP read the file again and apply the
//! difference to the running lb (listeners, backends, servers, routes, settings), all or
//! nothing, without cutting a flow; a refused file changes nothing and says every problem at
//! FILE:LINE:COLUMN.
use lb_tests::{
    bpf_available,
    lb::{lb_binary, process_alive, Lb, LbBuilder, Successors},
    servers,
};
use std::{net::SocketAddr, path::PathBuf, process::Output, time::Duration};
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
        .output();
    timeout(Duration::from_secs(30), run)
        .await
        .expect("lb command timed out")
        .expect("cannot run lb")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `lb reload`, which must succeed; what it printed.
async fn reload(lb: &Lb) -> String {
    let out = lb_cmd(lb, &["reload"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "reload failed: {stderr}");
    stdout
}

fn config_path(lb: &Lb) -> PathBuf {
    lb.dir().join("lb.yaml")
}

/// A flow through `addr`: the id of the server it reached, and the flow.
async fn flow(addr: SocketAddr) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
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
    let send = async { w.write_all(&data).await.unwrap() };
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

/// The address lb logged for listener `name` (the latest, after a reload added it).
async fn listening(lb: &Lb, name: &str) -> SocketAddr {
    let marker = format!("listener `{name}` listening on ");
    lb.wait_for_log(&marker).await;
    let log = lb.log();
    let line = log.lines().rev().find(|l| l.contains(&marker)).unwrap();
    let rest = &line[line.find(&marker).unwrap() + marker.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// A configuration: listener `test` (and `extra` when asked) to backend `pool` with `servers`
/// as (name, address, weight).
fn config(forwarding: &str, servers: &[(&str, SocketAddr, u32)], extra: bool) -> String {
    let mut y = format!(
        "forwarding: {{ mode: {forwarding}, offload_after: 0 }}\nadmin:\n  listen: 127.0.0.1:0\n\
         listeners:\n  - name: test\n    bind: 127.0.0.1:0\n    backend: pool\n"
    );
    if extra {
        y += "  - name: extra\n    bind: 127.0.0.1:0\n    backend: pool\n";
    }
    y += "backends:\n  - name: pool\n    servers:\n";
    for (name, addr, weight) in servers {
        y += &format!("      - {{ name: {name}, address: \"{addr}\", weight: {weight} }}\n");
    }
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_listeners_and_servers_without_cutting_flows() {
    let kernel = bpf_available("a_reload_adds_and_removes_listeners_and_servers_without_cutting_flows");
    let forwarding = if kernel { "kernel" } else { "user" };
    let (s0, s1) = (servers::named(0).await, servers::named(1).await);
    let lb = LbBuilder::new(&[s0])
        .forwarding(forwarding)
        .offload_after("0")
        .spawn();
    let (id, mut on_s0) = flow(lb.listener).await;
    assert_eq!(id, 0);
    echo_intact(&mut on_s0, 1 << 20).await;

    // A server and a listener added.
    std::fs::write(
        config_path(&lb),
        config(forwarding, &[("s0", s0, 1), ("s1", s1, 1)], true),
    )
    .unwrap();
    let said = reload(&lb).await;
    assert!(
        said.contains("listeners +1 -0 ~0") && said.contains("servers +1 -0 ~0"),
        "{said}"
    );
    assert!(
        said.contains("listeners added: extra") && said.contains("servers added: pool/s1"),
        "{said}"
    );
    let extra = listening(&lb, "extra").await;
    let mut seen = [0; 2];
    for _ in 0..6 {
        seen[usize::from(flow(extra).await.0)] += 1;
        seen[usize::from(flow(lb.listener).await.0)] += 1;
    }
    assert_eq!(
        seen,
        [6, 6],
        "round robin over both servers, through both listeners"
    );
    // The flow from before goes on.
    echo_intact(&mut on_s0, 1 << 20).await;
    let (_, mut on_extra) = flow(extra).await;

    // Server s0 and listener `extra` removed: their flows go on, no new flow reaches them.
    std::fs::write(config_path(&lb), config(forwarding, &[("s1", s1, 1)], false)).unwrap();
    let said = reload(&lb).await;
    assert!(
        said.contains("listeners +0 -1 ~0") && said.contains("servers +0 -1 ~0"),
        "{said}"
    );
    for _ in 0..6 {
        assert_eq!(
            flow(lb.listener).await.0,
            1,
            "a new flow reached the removed server"
        );
    }
    assert!(
        timeout(Duration::from_secs(10), TcpStream::connect(extra))
            .await
            .expect("connect timed out")
            .is_err(),
        "the removed listener still accepts"
    );
    echo_intact(&mut on_s0, 1 << 20).await;
    echo_intact(&mut on_extra, 1 << 20).await;
    if kernel {
        let m = lb.metrics();
        assert!(m.kernel_bytes() >= (8 << 20) as f64, "{}", m.text);
    }
    // The removed objects' series are gone; the kept ones count on.
    let m = lb.metrics();
    assert!(!m.text.contains("listener=\"extra\""), "{}", m.text);
    assert!(!m.text.contains("server=\"s0\""), "{}", m.text);
    assert!(
        m.get("lb_connections_total{listener=\"test\"}") >= 13.0,
        "{}",
        m.text
    );
    assert_eq!(m.get("lb_reloads_total{result=\"ok\"}"), 2.0, "{}", m.text);
    drop((on_s0, on_extra));
}

#[tokio::test]
async fn a_kept_server_keeps_what_an_operator_set_unless_the_file_changes_it() {
    let (s0, s1) = (servers::named(0).await, servers::named(1).await);
    let lb = LbBuilder::new(&[s0, s1]).weights(&[1, 1]).spawn();
    let out = lb_cmd(&lb, &["server", "drain", "pool/s0"]).await;
    assert!(out.status.success());
    let out = lb_cmd(&lb, &["server", "weight", "pool/s1", "7"]).await;
    assert!(out.status.success());
    // Another listener added: both servers stay as the operator left them.
    std::fs::write(
        config_path(&lb),
        config("auto", &[("s0", s0, 1), ("s1", s1, 1)], true),
    )
    .unwrap();
    reload(&lb).await;
    let stats = text(&lb_cmd(&lb, &["stats", "--json"]).await).0;
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let server = |name: &str| {
        v["backends"][0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(server("s0")["state"], "DRAIN", "{stats}");
    assert_eq!(server("s1")["weight"], 7, "{stats}");
    for _ in 0..4 {
        assert_eq!(
            flow(lb.listener).await.0,
            1,
            "a new flow reached the draining server"
        );
    }
    // The file changes s1's weight: the file's wins; s0 stays drained.
    std::fs::write(
        config_path(&lb),
        config("auto", &[("s0", s0, 1), ("s1", s1, 3)], true),
    )
    .unwrap();
    let said = reload(&lb).await;
    assert!(said.contains("servers changed: pool/s1"), "{said}");
    let stats = text(&lb_cmd(&lb, &["stats", "--json"]).await).0;
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let s = &v["backends"][0]["servers"];
    assert_eq!(s[0]["state"], "DRAIN", "{stats}");
    assert_eq!(s[1]["weight"], 3, "{stats}");
    // And the process says how its last reload went.
    assert_eq!(v["process"]["last_reload"]["result"], "ok", "{stats}");
}

#[tokio::test]
async fn a_refused_reload_changes_nothing_and_says_where() {
    let (s0, s1) = (servers::named(0).await, servers::named(1).await);
    let lb = LbBuilder::new(&[s0]).spawn();
    let good = std::fs::read_to_string(config_path(&lb)).unwrap();
    let path = config_path(&lb);
    let file = path.display().to_string();
    // Each file would add server s1; each has an error.
    let with_s1 = config("auto", &[("s0", s0, 1), ("s1", s1, 1)], true);
    let bad = [
        // Bad YAML.
        (
            format!("{with_s1}  - name: [unclosed\n"),
            format!("{file}:"),
        ),
        // An unknown key.
        (
            with_s1.replace("    backend: pool\n", "    backend: pool\n    colour: blue\n"),
            "unknown field `colour`".to_string(),
        ),
        // A missing certificate.
        (
            with_s1.replace(
                "  - name: extra\n    bind: 127.0.0.1:0\n    backend: pool\n",
                "  - name: extra\n    bind: 127.0.0.1:0\n    backend: pool\n    mode: http\n    tls:\n      certificates:\n        - { cert: /nonexistent/site.crt, key: /nonexistent/site.key }\n",
            ),
            "/nonexistent/site.crt".to_string(),
        ),
        // An address another listener has.
        (
            with_s1.replace(
                "  - name: extra\n    bind: 127.0.0.1:0\n",
                &format!("  - name: extra\n    bind: \"{}\"\n", lb.admin),
            ),
            "listener `extra`: cannot listen on".to_string(),
        ),
    ];
    for (i, (yaml, expected)) in bad.iter().enumerate() {
        std::fs::write(&path, yaml).unwrap();
        let out = lb_cmd(&lb, &["reload"]).await;
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "file {i} was accepted: {stdout}");
        assert!(
            stderr.contains(expected.as_str()) && stderr.contains("reload refused, nothing changed"),
            "file {i}: {stderr}"
        );
        if i < 3 {
            // The file's problems, each at its position.
            assert!(stderr.starts_with(&format!("{file}:")), "file {i}: {stderr}");
            let position = stderr.lines().next().unwrap()[file.len() + 1..]
                .split(':')
                .take(2)
                .all(|n| n.parse::<u32>().is_ok_and(|n| n > 0));
            assert!(position, "file {i}: {stderr}");
        }
        // Nothing changed: s1 gets no flow, no listener was added.
        for _ in 0..3 {
            assert_eq!(flow(lb.listener).await.0, 0, "file {i}");
        }
        assert!(!lb.log().contains("listener `extra` listening"), "file {i}");
    }
    let m = lb.metrics();
    assert_eq!(m.get("lb_reloads_total{result=\"refused\"}"), 4.0, "{}", m.text);
    assert!(!m.text.contains("server=\"s1\""), "{}", m.text);
    // SIGHUP reads the file too: refused, logged with the position.
    std::fs::write(&path, &bad[1].0).unwrap();
    // SAFETY: a plain signal to the child's pid.
    assert_eq!(unsafe { libc::kill(lb.pid() as i32, libc::SIGHUP) }, 0);
    lb.wait_for_log(&format!("SIGHUP: reload refused, nothing changed:\n{file}:"))
        .await;
    // Back to a good file: applied.
    std::fs::write(&path, &good).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(lb.pid() as i32, libc::SIGHUP) }, 0);
    lb.wait_for_log("SIGHUP: reloaded: listeners +0 -0 ~0").await;
}

/// The configuration of reload `i` under load: listeners `streams` (kernel flows), `conns`
/// (the connect loop) and `web` (wrk), and `extra` on odd reloads; the servers of each backend,
/// their weights and `web`'s routes change every time.
fn loaded_config(i: usize, paced: [SocketAddr; 2], named: [SocketAddr; 2], app: [SocketAddr; 2]) -> String {
    let mut y = String::from(
        "forwarding: { mode: kernel, offload_after: 0 }\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n\
         \x20 - { name: streams, bind: 127.0.0.1:0, backend: paced }\n\
         \x20 - { name: conns, bind: 127.0.0.1:0, backend: named }\n",
    );
    y += &format!(
        "  - name: web\n    bind: 127.0.0.1:0\n    mode: http\n    default_backend: app\n    routes:\n\
         \x20     - {{ path_prefix: /r{i}, backend: named }}\n"
    );
    if i % 2 == 1 {
        y += &format!("  - {{ name: extra{i}, bind: 127.0.0.1:0, backend: named }}\n");
    }
    let server = |name: &str, addr: SocketAddr, weight: usize| {
        format!("      - {{ name: {name}, address: \"{addr}\", weight: {weight} }}\n")
    };
    y += "backends:\n  - name: paced\n    servers:\n";
    y += &server("p0", paced[0], 1 + i % 3);
    if !i.is_multiple_of(3) {
        y += &server("p1", paced[1], 1);
    }
    y += "  - name: named\n    servers:\n";
    y += &server("n0", named[0], 1 + i % 2);
    if i.is_multiple_of(2) {
        y += &server("n1", named[1], 2);
    }
    y += "  - name: app\n    servers:\n";
    y += &server("a0", app[0], 1 + i % 4);
    if i % 2 == 1 {
        y += &server("a1", app[1], 1);
    }
    y
}

/// wrk's script: every response must be the app's answer to `GET /wrk`.
const WRK_SCRIPT: &str = r#"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= 200 or not body:find("^app GET /wrk\n") then bad = bad + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("bad") end
  io.write(string.format("requests=%d bad=%d errors=%d\n", summary.requests, total,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
"#;

/// One connection of the connect loop: the server's id, then one byte echoed.
async fn connect_once(addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut id = [0u8; 1];
        s.read_exact(&mut id).await.map_err(|e| format!("id: {e}"))?;
        s.write_all(b"x").await.map_err(|e| format!("write: {e}"))?;
        let mut back = [0u8; 1];
        s.read_exact(&mut back).await.map_err(|e| format!("echo: {e}"))?;
        Ok::<_, String>(())
    };
    timeout(lb_tests::slack(Duration::from_secs(10)), attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// The issue's load test: wrk with keep-alive, 100 kernel-forwarded streams checked with
/// sha256 and a connect loop, while 20 reloads change servers, weights and routes and add and
/// remove a listener, and 5 upgrades move the streams to a new process each: no failed
/// request, no cut or corrupted stream, no refused connection, and each old process gone
/// within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_and_upgrades_under_load_cut_nothing() {
    if !bpf_available("reloads_and_upgrades_under_load_cut_nothing") {
        return;
    }
    use lb_tests::paced::{self, PacedSpec, Reading};
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let paced_servers = [paced::serve_into(tx.clone()), paced::serve_into(tx)];
    let named = [servers::named(0).await, servers::named(1).await];
    let apps = [
        lb_tests::http::Reflector::start("app").await,
        lb_tests::http::Reflector::start("app").await,
    ];
    let app = [apps[0].addr, apps[1].addr];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.yaml");
    std::fs::write(&path, loaded_config(0, paced_servers, named, app)).unwrap();
    let mut cmd = std::process::Command::new(lb_binary());
    cmd.args(["run", "-c"]).arg(&path);
    let lb = lb_tests::lb::spawn_command(cmd, dir).unwrap();
    let (streams, conns, web) = (
        listening(&lb, "streams").await,
        listening(&lb, "conns").await,
        listening(&lb, "web").await,
    );

    // 100 streams, 8 MiB each way, whose readers pause: they last through the reloads. (Under
    // LB_TEST_SCALE, in an emulated VM, smaller and read more slowly, so that they still do.)
    let scale = u64::from(lb_tests::scale());
    let reading = Reading {
        stall_ms: 0,
        burst: ((16 << 10) / scale, (64 << 10) / scale),
        pause_ms: (5 * scale, 30 * scale),
    };
    let size = lb_tests::scaled(8 << 20) as u64;
    let specs: Vec<PacedSpec> = (0..100u64)
        .map(|seed| PacedSpec {
            up: size,
            down: size,
            seed: 1000 + seed,
            client_reads: reading,
            server_reads: reading,
        })
        .collect();
    let flows: Vec<_> = specs
        .iter()
        .map(|&spec| {
            tokio::spawn(async move {
                paced::run_client(streams, spec, &std::sync::atomic::AtomicU64::new(0)).await
            })
        })
        .collect();
    // The connect loop, until the reloads are over (bounded in count too).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let connects = tokio::spawn({
        let done = done.clone();
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for _ in 0..100_000 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match connect_once(conns).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }
    });
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), WRK_SCRIPT).unwrap();
    let url = format!("http://{web}/wrk");
    let wrk = {
        let script = script.path().to_str().unwrap().to_string();
        tokio::spawn(async move {
            lb_tests::http::run_tool(
                "wrk",
                // (A request over wrk's default 2 s would count as an error: on a loaded
                // 2-core machine, with a build beside, one took 1.97 s.)
                &[
                    "-t",
                    "2",
                    "-c",
                    "8",
                    "-d",
                    "7s",
                    "--timeout",
                    &format!("{}s", 10 * lb_tests::scale()),
                    "-s",
                    &script,
                    &url,
                ],
            )
            .await
        })
    };

    let mut successors = Successors(Vec::new());
    let (mut upgrades, mut exits) = (0, Vec::new());
    for i in 1..=20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        std::fs::write(
            lb.dir().join("lb.yaml"),
            loaded_config(i, paced_servers, named, app),
        )
        .unwrap();
        let said = reload(&lb).await;
        assert!(said.contains("reloaded: "), "reload {i}: {said}");
        if i % 2 == 1 {
            // The listener this reload added serves at once.
            connect_once(listening(&lb, &format!("extra{i}")).await)
                .await
                .unwrap_or_else(|e| panic!("reload {i}: the new listener: {e}"));
        }
        if i % 4 == 0 {
            // An upgrade: the streams move to the new process with their sockets; the old one
            // has only wrk's kept-alive connections left, which close after their response
            // (`Connection: close`), so it exits at once.
            let old = serving_pid(&lb).await;
            let out = lb_cmd(&lb, &["upgrade"]).await;
            let (stdout, stderr) = text(&out);
            assert!(out.status.success(), "upgrade after reload {i}: {stderr}");
            let new: u32 = stdout
                .strip_prefix("upgraded: pid ")
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("{stdout}"));
            successors.0.push(new);
            upgrades += 1;
            let started = std::time::Instant::now();
            let bound = lb_tests::slack(Duration::from_secs(1));
            while process_alive(old) && started.elapsed() < bound {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                !process_alive(old),
                "upgrade after reload {i}: pid {old} still there {bound:?} later"
            );
            exits.push(started.elapsed());
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = connects.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok > 20, "the connect loop made {ok} connections");
    let out = wrk.await.unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with("requests="))
        .unwrap_or_else(|| panic!("{out}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap()
    };
    assert!(field("requests") > 100, "{out}");
    assert_eq!((field("bad"), field("errors")), (0, 0), "{out}");
    let (clients, by_seed) = lb_tests::gather(flows, &mut reports, |r| r.0, Duration::from_secs(120)).await;
    for (spec, client) in specs.iter().zip(&clients) {
        paced::assert_intact(spec, client, &by_seed[&spec.seed].1);
    }
    let m = lb.metrics();
    // Counted by the last process: the reloads since the last upgrade.
    assert_eq!(m.counted("lb_reloads_total{result=\"ok\"}"), 0.0, "{}", m.text);
    // The streams went through the kernel.
    assert!(m.kernel_bytes() >= lb_tests::scaled(1 << 30) as f64, "{}", m.text);
    let latency = out
        .lines()
        .find(|l| l.trim_start().starts_with("Latency"))
        .unwrap_or("");
    assert_eq!(upgrades, 5);
    eprintln!(
        "20 reloads and 5 upgrades under load: wrk {line} ({}); {ok} connections; 100 streams of {size} bytes each way intact; old processes exited after {exits:?}",
        latency.split_whitespace().collect::<Vec<_>>().join(" ")
    );
}

/// An HTTP configuration: listener `web` (and `other` when asked) to backend `app` with one
/// server at `app`; `check`: a health check on it.
fn http_config(app: SocketAddr, check: bool, other: bool) -> String {
    let mut y = String::from(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    bind: 127.0.0.1:0\n    mode: http\n    default_backend: app\n",
    );
    if other {
        y += "  - name: other\n    bind: 127.0.0.1:0\n    mode: http\n    default_backend: app\n";
    }
    y += "backends:\n  - name: app\n";
    if check {
        y += "    health_check: { kind: tcp, interval: 100ms, fall: 1, rise: 1 }\n";
    }
    y += &format!("    servers:\n      - {{ name: a, address: \"{app}\" }}\n");
    y
}

/// Sends `GET path` on a kept-alive connection; the response.
async fn get(c: &mut TcpStream, path: &str) -> String {
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    lb_tests::http::read_response(c).await
}

/// What a kept-alive HTTP connection does across reloads: it moves to the new configuration
/// between requests (a new server address, a backend renamed away), and closes when its
/// listener is removed.
#[tokio::test]
async fn a_kept_alive_http_connection_follows_reloads() {
    use lb_tests::http::Reflector;
    let (first, second) = (Reflector::start("first").await, Reflector::start("second").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.yaml");
    std::fs::write(&path, http_config(first.addr, false, true)).unwrap();
    let mut cmd = std::process::Command::new(lb_binary());
    cmd.args(["run", "-c"]).arg(&path);
    let lb = lb_tests::lb::spawn_command(cmd, dir).unwrap();
    let (web, other) = (listening(&lb, "web").await, listening(&lb, "other").await);
    let mut c = TcpStream::connect(web).await.unwrap();
    assert!(get(&mut c, "/1").await.contains("first GET /1"));
    let mut on_other = TcpStream::connect(other).await.unwrap();
    assert!(get(&mut on_other, "/1").await.contains("first GET /1"));

    // The server's address changes, and `other` is removed: the same connection's next
    // request reaches the new address.
    std::fs::write(lb.dir().join("lb.yaml"), http_config(second.addr, false, false)).unwrap();
    reload(&lb).await;
    let answer = get(&mut c, "/2").await;
    assert!(answer.contains("second GET /2"), "{answer}");
    // The removed listener's idle connection is closed.
    let mut rest = Vec::new();
    let n = timeout(Duration::from_secs(10), on_other.read_to_end(&mut rest))
        .await
        .expect("the removed listener's kept-alive connection stayed open");
    assert!(n.is_ok() && rest.is_empty(), "{n:?} {rest:?}");

    // The backend is renamed (the old one removed): still answered, by the new one.
    std::fs::write(
        lb.dir().join("lb.yaml"),
        http_config(second.addr, false, false).replace("app", "site"),
    )
    .unwrap();
    reload(&lb).await;
    let answer = get(&mut c, "/3").await;
    assert!(
        answer.starts_with("HTTP/1.1 200 ") && answer.contains("second GET /3"),
        "{answer}"
    );
}

/// A server a health check took DOWN comes back UP when a reload removes the check (nothing
/// else would bring it back).
#[tokio::test]
async fn a_server_down_comes_back_when_its_check_is_removed() {
    let refusing = servers::refusing().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.yaml");
    std::fs::write(&path, http_config(refusing, true, false)).unwrap();
    let mut cmd = std::process::Command::new(lb_binary());
    cmd.args(["run", "-c"]).arg(&path);
    let lb = lb_tests::lb::spawn_command(cmd, dir).unwrap();
    let state = |lb: &Lb| lb.metrics().get("lb_server_up{backend=\"app\",server=\"a\"}");
    lb.wait_for_log("server is DOWN").await;
    assert_eq!(state(&lb), 0.0);
    std::fs::write(lb.dir().join("lb.yaml"), http_config(refusing, false, false)).unwrap();
    reload(&lb).await;
    assert_eq!(state(&lb), 1.0);
}

/// The pid of the lb answering on the admin endpoint.
async fn serving_pid(lb: &Lb) -> u32 {
    let (stdout, stderr) = text(&lb_cmd(lb, &["stats", "--json"]).await);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("{stderr}"));
    v["process"]["pid"].as_u64().unwrap() as u32
}
