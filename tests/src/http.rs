//! HTTP fixtures: an lb with one `mode: http` listener ([`HttpLbBuilder`]), a reflecting
//! backend that answers every request with the request it received ([`Reflector`]), and a raw
//! client for heads no well-behaved client would send ([`raw_exchange`]).
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    lb::{lb_binary, spawn_command, Lb},
    tls::{Pki, TlsClient},
};

/// A backend that answers each request with `200` and a body describing it: `NAME METHOD
/// TARGET`, one `name: value` line per header field as received (names lowercased by hyper),
/// then `body=` and the body. `GET /status/NNN` answers NNN instead; `GET /size/N` answers N
/// bytes.
pub struct Reflector {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Requests received.
    pub requests: Arc<AtomicUsize>,
}

impl Reflector {
    pub async fn start(name: &'static str) -> Reflector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        r.fetch_add(1, SeqCst);
                        reflect(name, req)
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Reflector {
            addr,
            connections,
            requests,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(SeqCst)
    }
}

async fn reflect(
    name: &str,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
        let mut resp = Response::new(Full::new(Bytes::from(format!("status {code}\n"))));
        *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
        return Ok(resp);
    }
    if let Some(n) = path.strip_prefix("/size/").and_then(|c| c.parse::<usize>().ok()) {
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; n]))));
    }
    let mut text = format!("{name} {} {}\n", req.method(), req.uri());
    for (k, v) in req.headers() {
        text += &format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    text += "body=";
    let mut out = text.into_bytes();
    out.extend_from_slice(&body);
    Ok(Response::new(Full::new(Bytes::from(out))))
}

/// Builds an lb with one `mode: http` listener named `web` on 127.0.0.1:0.
pub struct HttpLbBuilder {
    backends: Vec<(String, Vec<SocketAddr>)>,
    listener: Vec<String>,
    top: Vec<String>,
    /// YAML lines per backend name.
    backend_yaml: Vec<(String, String)>,
    server_options: String,
    tls: bool,
}

impl HttpLbBuilder {
    /// The listener's default backend, `app`, with these servers.
    pub fn new(app: &[SocketAddr]) -> HttpLbBuilder {
        HttpLbBuilder {
            backends: vec![("app".into(), app.to_vec())],
            listener: Vec::new(),
            top: Vec::new(),
            backend_yaml: Vec::new(),
            server_options: String::new(),
            tls: false,
        }
    }
    /// The listener terminates TLS (`tls: true`): with a certificate for `lb.test` and
    /// 127.0.0.1 from a CA made for the test; [`Lb::connect`] and friends then speak TLS.
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }
    /// Another backend.
    pub fn backend(mut self, name: &str, servers: &[SocketAddr]) -> Self {
        self.backends.push((name.into(), servers.to_vec()));
        self
    }
    /// YAML lines for the listener, indented by the caller as keys of the listener (4 spaces),
    /// e.g. `"    routes:\n      - { path_prefix: /api/, backend: api }\n"`.
    pub fn listener_yaml(mut self, yaml: &str) -> Self {
        self.listener.push(yaml.into());
        self
    }
    /// YAML lines for the `app` backend, indented as its keys (4 spaces), e.g.
    /// `"    balance: uri\n"`.
    pub fn app_yaml(self, yaml: &str) -> Self {
        self.backend_yaml("app", yaml)
    }
    /// YAML lines for backend `name`, indented as its keys (4 spaces).
    pub fn backend_yaml(mut self, name: &str, yaml: &str) -> Self {
        self.backend_yaml.push((name.into(), yaml.into()));
        self
    }
    /// More keys for every server's flow mapping, e.g. `"maxconn: 1"`.
    pub fn server_options(mut self, keys: &str) -> Self {
        self.server_options = format!(", {keys}");
        self
    }
    /// Top-level YAML, e.g. `"limits: { max_header_bytes: 4KiB }\n"`.
    pub fn top_yaml(mut self, yaml: &str) -> Self {
        self.top.push(yaml.into());
        self
    }

    pub fn config_text(&self) -> String {
        let mut y = String::from("forwarding: auto\nadmin:\n  listen: 127.0.0.1:0\n");
        for t in &self.top {
            y += t;
        }
        y += "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    mode: http\n    default_backend: app\n";
        if self.tls {
            y += "    tls:\n      certificates:\n        - { cert: lb.pem, key: lb.key }\n";
        }
        for l in &self.listener {
            y += l;
        }
        y += "backends:\n";
        for (name, servers) in &self.backends {
            y += &format!("  - name: {name}\n");
            for (_, line) in self.backend_yaml.iter().filter(|(b, _)| b == name) {
                y += line;
            }
            y += "    servers:\n";
            for (i, s) in servers.iter().enumerate() {
                y += &format!(
                    "      - {{ name: s{i}, address: \"{s}\"{} }}\n",
                    self.server_options
                );
            }
        }
        y
    }

    pub fn spawn(self) -> Lb {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lb.yaml");
        std::fs::write(&path, self.config_text()).expect("write config");
        let tls = self.tls.then(|| {
            let pki = Pki::new(dir.path(), "lb");
            pki.issue("lb", &["lb.test", "127.0.0.1"]);
            TlsClient {
                name: "lb.test".into(),
                ca: pki.ca_pem.clone(),
                config: pki.client(),
            }
        });
        let mut cmd = Command::new(lb_binary());
        cmd.args(["run", "-c"]).arg(&path);
        let mut lb = spawn_command(cmd, dir).unwrap_or_else(|e| panic!("lb did not start: {e}"));
        lb.tls = tls;
        lb
    }
}

/// Sends `request` on a new connection and reads until lb closes it (at most 10 s); returns
/// everything received.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// Reads one response with a Content-Length body from a kept-alive connection (at most 10 s
/// for each read); its text, head and body.
pub async fn read_response(c: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")?
                        .parse()
                        .ok()
                })
                .expect("a Content-Length");
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("no response within 10 s")
            .unwrap();
        assert!(n > 0, "closed within a response: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// The status code of the first response in `bytes`.
pub fn status_of(bytes: &[u8]) -> Option<u16> {
    let line = bytes.split(|&b| b == b'\n').next()?;
    let code = line.split(|&b| b == b' ').nth(1)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Runs a command to completion (at most 30 s) and returns its stdout; panics with its stderr
/// when it fails.
pub async fn run_tool(program: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(program).args(args).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} timed out"))
    .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-connection backend that answers from a script: it reads the request head, sends
/// `first`, waits until [`Scripted::go`] (so the test can act while the response is under way;
/// it keeps reading meanwhile), sends `rest`, shuts its write side, then reads until the other
/// side ends. [`Scripted::received`] tells what it received on the connection.
pub struct Scripted {
    pub addr: SocketAddr,
    go: Option<tokio::sync::oneshot::Sender<()>>,
    received: tokio::task::JoinHandle<Received>,
}

/// What a [`Scripted`] backend received.
pub struct Received {
    pub bytes: Vec<u8>,
    /// The other side ended its stream before the backend was told to send the rest.
    pub ended_before_go: bool,
}

impl Scripted {
    pub async fn start(first: Vec<u8>, rest: Vec<u8>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let received = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut r = Received {
                bytes: Vec::new(),
                ended_before_go: false,
            };
            let mut buf = [0u8; 4096];
            while !r.bytes.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return r,
                    Ok(n) => r.bytes.extend_from_slice(&buf[..n]),
                }
            }
            if s.write_all(&first).await.is_err() {
                return r;
            }
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    go = &mut wait => match go {
                        Ok(()) => break,
                        Err(_) => return r,
                    },
                    n = s.read(&mut buf), if !r.ended_before_go => match n {
                        Ok(0) | Err(_) => r.ended_before_go = true,
                        Ok(n) => r.bytes.extend_from_slice(&buf[..n]),
                    },
                }
            }
            if s.write_all(&rest).await.is_err() {
                return r;
            }
            let _ = s.shutdown().await;
            let _ = s.read_to_end(&mut r.bytes).await;
            r
        });
        Scripted {
            addr,
            go: Some(go),
            received,
        }
    }

    /// Lets the backend send the rest.
    pub fn go(&mut self) {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
    }

    /// What the backend received, once its connection ended (at most 30 s).
    pub async fn received(mut self) -> Received {
        self.go();
        tokio::time::timeout(Duration::from_secs(30), self.received)
            .await
            .expect("the scripted backend's connection did not end")
            .expect("the scripted backend failed")
    }
}

/// `n` bytes of a pattern that shows where a byte came from (its offset mod 251).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}
