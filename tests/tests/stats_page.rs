//! The stats page (`GET /stats` on the admin endpoint) opened in a real browser: headless
//! Chromium (Debian's) renders it, the test reads the rendered DOM for the per-server rows and
//! their states, and a screenshot is kept as a test artifact
//! (`target/test-artifacts/stats-page.png`).
use lb_tests::{
    http::{HttpLbBuilder, Reflector},
    program_available, servers,
};
use std::{path::PathBuf, process::Output, time::Duration};
use tokio::{io::AsyncWriteExt, net::TcpStream, time::timeout};

/// Runs headless Chromium with `args` (bounded at 60 s).
async fn chromium(args: &[&str]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            // Root in CI: Chromium's sandbox refuses to run as root.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = timeout(Duration::from_secs(60), run)
        .await
        .expect("chromium timed out")
        .expect("cannot run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The row of `server` in the backend table of `backend`, as the browser rendered it.
fn row<'a>(dom: &'a str, backend: &str, server: &str) -> &'a str {
    let table = dom
        .split("<table class=\"backend\"")
        .find(|t| t.starts_with(&format!(" data-backend=\"{backend}\"")))
        .unwrap_or_else(|| panic!("no table for backend {backend}:\n{dom}"));
    let start = table
        .find(&format!("data-server=\"{server}\""))
        .unwrap_or_else(|| panic!("no row for {backend}/{server}"));
    let begin = table[..start].rfind("<tr").unwrap();
    let end = start + table[start..].find("</tr>").unwrap();
    &table[begin..end]
}

#[tokio::test]
async fn the_stats_page_shows_every_server_in_its_state() {
    if !program_available("the_stats_page_shows_every_server_in_its_state", "chromium") {
        return;
    }
    let (web1, web2) = (Reflector::start("web1").await, Reflector::start("web2").await);
    let refusing = servers::refusing().await;
    let api = Reflector::start("api").await;
    let lb = HttpLbBuilder::new(&[web1.addr, web2.addr, refusing])
        .app_yaml("    health_check: { interval: 100ms, fall: 1 }\n")
        .backend("api", &[api.addr])
        .listener_yaml("    routes:\n      - { path_prefix: /api/, backend: api }\n")
        .spawn();
    // s2 refuses: DOWN after one failed check. s1 is drained by an operator.
    lb.wait_for("s2 DOWN", |m| {
        m.get("lb_server_up{backend=\"app\",server=\"s2\"}") == 0.0
    })
    .await;
    let mut admin = TcpStream::connect(lb.admin).await.unwrap();
    let drain = format!(
        "POST /servers/app/s1/drain HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        lb.admin
    );
    admin.write_all(drain.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut admin, &mut answer)
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let url = format!("http://{}/stats", lb.admin);
    let dom = String::from_utf8(chromium(&["--dump-dom", &url]).await.stdout).unwrap();
    assert_eq!(dom.matches("<table class=\"backend\"").count(), 2, "{dom}");
    for (backend, server, state) in [
        ("app", "s0", "UP"),
        ("app", "s1", "DRAIN"),
        ("app", "s2", "DOWN"),
        ("api", "s0", "UP"),
    ] {
        let r = row(&dom, backend, server);
        assert!(
            r.starts_with(&format!("<tr class=\"{state}\"")),
            "{backend}/{server}: {r}"
        );
        assert!(r.contains(&format!("<td class=\"state\">{state}</td>")), "{r}");
    }
    assert!(
        row(&dom, "app", "s2").contains("connect:"),
        "the failed check's reason"
    );

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("stats-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1400,700",
        &url,
    ])
    .await;
    let png = std::fs::read(&shot).expect("no screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
