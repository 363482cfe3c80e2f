//! The client side of the admin endpoint, for `lb stats` and `lb server ...`: one HTTP/1.1
//! request to a running lb, and the answer printed for a person.
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::{fmt::Write, net::SocketAddr, time::Duration};
use tokio::net::TcpStream;

use crate::{
    config::visible as v,
    stats::{ServerStats, Stats},
};

/// Bound on the whole request (connect, send, answer).
const LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    // (The causes are in the messages, not chained: `lb` prints the whole chain.)
    #[error("cannot reach lb's admin endpoint at {addr}: {error}")]
    Connect { addr: SocketAddr, error: std::io::Error },
    #[error("admin endpoint at {addr}: {error}")]
    Http { addr: SocketAddr, error: hyper::Error },
    #[error("admin endpoint at {addr} did not answer within {limit:?}")]
    Timeout { addr: SocketAddr, limit: Duration },
    #[error("lb answered {status}: {body}")]
    Refused { status: StatusCode, body: String },
    #[error("cannot make that request: {0}")]
    Request(String),
    #[error("unreadable answer from lb: {0}")]
    Format(#[from] serde_json::Error),
}

/// Where a running lb's admin endpoint is, and its token if it has one.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl Endpoint {
    /// Sends `method path` and returns the body of a 2xx answer.
    pub async fn call(&self, method: Method, path: &str) -> Result<String, AdminError> {
        self.send(method, path, Bytes::new(), LIMIT).await
    }

    /// Sends `method path` with `body`, waiting at most `limit` for the whole exchange.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        limit: Duration,
    ) -> Result<String, AdminError> {
        match tokio::time::timeout(limit, self.exchange(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(AdminError::Timeout {
                addr: self.addr,
                limit,
            }),
        }
    }

    async fn exchange(&self, method: Method, path: &str, body: Bytes) -> Result<String, AdminError> {
        let addr = self.addr;
        let http = |error| AdminError::Http { addr, error };
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|error| AdminError::Connect { addr, error })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string());
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        // A name or token no URL or header can carry is the caller's mistake, not a panic.
        let req = req
            .body(Full::new(body))
            .map_err(|e| AdminError::Request(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(body)
        } else {
            Err(AdminError::Refused {
                status,
                body: error_text(&body),
            })
        }
    }

    pub async fn stats(&self) -> Result<Stats, AdminError> {
        Ok(serde_json::from_str(
            &self.call(Method::GET, "/stats.json").await?,
        )?)
    }
}

/// The `error` of a JSON error answer, else the body as it is.
fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}

/// `lb stats` for a person: the listeners, then a table per backend. Every text from lb's answer
/// has its control characters escaped ([`v`]): a check result carries a server's words, and an
/// older lb's names were not checked, and a terminal must not act on either.
pub fn format_stats(s: &Stats) -> String {
    let mut out = String::new();
    let path = if s.forwarding == "kernel" {
        "the kernel (sockmap)"
    } else {
        "userspace"
    };
    let _ = writeln!(out, "lb {}, established flows forwarded by {path}", s.version);
    if let Some(p) = &s.process {
        let _ = writeln!(out, "{}", v(&crate::stats::process_line(p)));
    }
    if let Some(tls) = &s.tls_forwarding {
        let _ = writeln!(out, "flows with a TLS side forwarded by {}", v(tls));
    }
    let _ = writeln!(
        out,
        "\nLISTENER              BIND                   MODE  BACKEND           NOW     TOTAL"
    );
    for l in &s.listeners {
        let _ = writeln!(
            out,
            "{:<21} {:<22} {:<5} {:<15} {:>5} {:>9}",
            v(&l.name),
            v(&l.bind),
            v(&l.mode),
            v(&l.backend),
            l.active,
            l.total
        );
    }
    for l in &s.listeners {
        let Some(tls) = &l.tls else { continue };
        let _ = writeln!(
            out,
            "\nTLS {}: {} handshake(s), {} failed",
            v(&l.name),
            tls.handshakes,
            tls.failed
        );
        for c in &tls.certificates {
            let _ = writeln!(
                out,
                "  {} [{}] until {} ({})",
                v(&c.subject),
                v(&c.names.join(", ")),
                v(&c.not_after),
                v(&c.file)
            );
        }
    }
    for b in &s.backends {
        let _ = writeln!(
            out,
            "\nBACKEND {} ({}; queue {}, retries {}, unserved {})",
            v(&b.name),
            v(&b.balance),
            b.queue,
            b.retries,
            b.unserved
        );
        let _ = writeln!(
            out,
            "  {:<16} {:<22} {:<6} {:>6} {:>5} {:>8} {:>8} {:>7} {:>12} {:>12}  CHECK",
            "SERVER", "ADDRESS", "STATE", "WEIGHT", "NOW", "MAXCONN", "TOTAL", "ERRORS", "KERNEL B", "USER B"
        );
        for sv in &b.servers {
            server_line(&mut out, sv);
        }
    }
    out
}

fn server_line(out: &mut String, s: &ServerStats) {
    let _ = writeln!(
        out,
        "  {:<16} {:<22} {:<6} {:>6} {:>5} {:>8} {:>8} {:>7} {:>12} {:>12}  {}",
        v(&s.name),
        v(&s.address),
        v(&s.state),
        s.weight,
        s.active,
        s.maxconn.map_or("-".to_string(), |m| m.to_string()),
        s.total,
        s.connect_errors,
        s.bytes_kernel,
        s.bytes_user,
        v(&s.check)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{BackendStats, ListenerStats};

    #[test]
    fn control_characters_reach_the_terminal_escaped() {
        let stats = Stats {
            version: "0.1.0".into(),
            process: None,
            forwarding: "user".into(),
            tls_forwarding: None,
            listeners: vec![ListenerStats {
                name: "web\x1b[2J".into(),
                bind: "127.0.0.1:80".into(),
                mode: "tcp".into(),
                backend: "app".into(),
                active: 0,
                total: 0,
                tls: None,
            }],
            backends: vec![BackendStats {
                name: "app".into(),
                balance: "roundrobin".into(),
                queue: 0,
                retries: 0,
                unserved: 0,
                servers: vec![ServerStats {
                    name: "s1".into(),
                    address: "127.0.0.1:81".into(),
                    state: "DOWN".into(),
                    // A server's words: a check result with a line break and a bell.
                    check: "http: 500 oops\r\nX: \x07".into(),
                    weight: 1,
                    maxconn: None,
                    active: 0,
                    total: 0,
                    connect_errors: 0,
                    check_failures: 1,
                    bytes_kernel: 0,
                    bytes_user: 0,
                }],
            }],
        };
        let out = format_stats(&stats);
        assert!(out.contains("web\\u{1b}[2J"), "{out}");
        assert!(out.contains("http: 500 oops\\r\\nX: \\u{7}"), "{out}");
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    }
}
