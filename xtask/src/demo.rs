//! `cargo xtask demo`: lb on conf/demo.yaml in front of two small demo servers on loopback.
//!
//! The demo servers answer any request (an HTTP request from curl, or a line from nc) with a
//! short HTTP/1.0 response naming themselves, so round robin is visible from the command line,
//! followed by the request they received (so HTTP mode's rewriting is visible too).
use anyhow::{Context, Result};
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

const SERVERS: [(&str, &str); 2] = [("demo-1", "127.0.0.1:9001"), ("demo-2", "127.0.0.1:9002")];

pub fn run() -> Result<()> {
    let ebpf = crate::setup::ensure(false)?;
    if !ebpf {
        eprintln!("xtask demo: WARNING: the eBPF toolchain is missing; lb will forward in userspace");
    }
    eprintln!("xtask demo: building lb (release; the first build takes about 4 minutes here)");
    let lb = crate::lb_bin::build(true, ebpf)?;
    let root = crate::root();
    for (name, addr) in SERVERS {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("demo server {name} cannot listen on {addr} (in use?)"))?;
        std::thread::spawn(move || serve(name, listener));
    }
    println!(
        "\nlb demo: two demo servers on 127.0.0.1:9001 and :9002, lb on 127.0.0.1:8080 (TCP) and :8081 (HTTP).\n\
         Try, in another terminal:\n  \
         curl http://127.0.0.1:8080/          (run it twice: the servers alternate)\n  \
         echo hello | nc -q1 127.0.0.1 8080\n  \
         curl http://127.0.0.1:8081/          (HTTP mode: the request the server got, X-Forwarded-For and X-Demo added)\n  \
         curl http://127.0.0.1:8081/two/x     (routed to demo-2 only)\n  \
         printf 'GET / HTTP/1.1\\r\\nHost: a\\r\\nHost: b\\r\\n\\r\\n' | nc -q1 127.0.0.1 8081   (400: refused before any server)\n  \
         curl http://127.0.0.1:8404/metrics   (lb_forwarded_bytes_total{{path=\"kernel\"}} grows)\n\
         Stop with Ctrl-C.\n"
    );
    let config = root.join("conf/demo.yaml");
    // lb receives the terminal's Ctrl-C itself and stops gracefully; the demo servers are
    // threads of this process and end with it.
    let status = Command::new(lb)
        .args(["run", "-c"])
        .arg(&config)
        .status()
        .context("starting lb")?;
    if !status.success() && status.code().is_some() {
        anyhow::bail!("lb exited with {status}");
    }
    Ok(())
}

fn serve(name: &'static str, listener: TcpListener) {
    let count = AtomicU64::new(0);
    for stream in listener.incoming().flatten() {
        let n = count.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = answer(name, n, stream);
    }
}

/// Reads the request (up to a blank line or a newline, at most 2 s) and answers.
fn answer(name: &str, n: u64, mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while req.len() < 64 * 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => req.extend_from_slice(&buf[..k]),
        }
        let http = req.starts_with(b"GET ") || req.starts_with(b"HEAD ") || req.starts_with(b"POST ");
        if (http && req.windows(4).any(|w| w == b"\r\n\r\n")) || (!http && req.contains(&b'\n')) {
            break;
        }
    }
    let body = format!(
        "hello from {name} (connection #{n} to it, {} request bytes)\n--- what it received:\n{}",
        req.len(),
        String::from_utf8_lossy(&req)
    );
    write!(
        s,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
