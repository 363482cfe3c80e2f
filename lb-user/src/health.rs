//! Health checks (a backend's `health_check:`), beside the data path: one task per checked
//! server on the main runtime, which probes it every `interval` and moves it DOWN after `fall`
//! failures in a row and UP after `rise` successes ([`crate::balance::ServerLive::set_up`]); the balancers skip
//! a DOWN server from the next pick. Passive ejection (`observe:`) takes a server DOWN from the
//! data path; the same checks bring it back.
//!
//! A server in maintenance is still probed (so that it is known to be healthy when it comes
//! back), like HAProxy's checks on a MAINT server.
use std::{sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{timeout, Instant},
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{CheckKind, HealthCheck, Server},
    runtime::BackendRt,
    stream::Stream,
};

/// Most bytes of a check's response head read.
const MAX_HEAD: usize = 16 << 10;

/// Starts the checks of every server of every backend that has a `health_check`; they end
/// when `stop` is cancelled, or the backend's `checks` (a reload replaced or removed it).
pub fn spawn(backends: &[Arc<BackendRt>], stop: &CancellationToken) {
    for backend in backends {
        let Some(check) = &backend.config.health_check else {
            continue;
        };
        for s in 0..backend.config.servers.len() {
            let (backend, stop, check) = (backend.clone(), stop.clone(), check.clone());
            tokio::spawn(async move {
                tokio::select! {
                    // A check cancelled by a reload must not write a last result (the server
                    // may have a new address now): cancellation first.
                    biased;
                    () = stop.cancelled() => {}
                    () = backend.checks.cancelled() => {}
                    () = run(&backend, s, &check) => {}
                }
            });
        }
    }
}

/// Checks one server until cancelled.
async fn run(backend: &BackendRt, server: usize, check: &HealthCheck) {
    let b = &backend.config;
    let (s, live, counters) = backend.server(server);
    let failures = &counters.check_failures;
    let mut run = Run::default();
    // The first check at once: a server down at start is known within `fall` intervals.
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        next += check.interval;
        let result = probe(s, &check.kind, check.timeout).await;
        if backend.checks.is_cancelled() {
            return;
        }
        live.set_last_check(match &result {
            Ok(()) => "OK".into(),
            Err(why) => why.clone(),
        });
        if result.is_err() {
            failures.inc();
        }
        match run.record(live.is_up(), result.is_ok(), check) {
            Some(true) => {
                live.set_up(true);
                tracing::warn!(backend = %b.name, server = %s.name, "server is UP: {} check(s) passed", check.rise);
            }
            Some(false) => {
                live.set_up(false);
                let why = result.err().unwrap_or_default();
                tracing::warn!(backend = %b.name, server = %s.name, "server is DOWN: {} check(s) failed, last: {why}", check.fall);
            }
            None => {}
        }
        // A check that overran its slot does not make the next ones run back to back.
        next = next.max(Instant::now());
    }
}

/// The checks in a row that agree.
#[derive(Debug)]
struct Run {
    passed: u32,
    failed: u32,
    /// The health the last check left the server in.
    seen_up: bool,
}

impl Default for Run {
    fn default() -> Run {
        Run {
            passed: 0,
            failed: 0,
            seen_up: true,
        }
    }
}

impl Run {
    /// Counts one check of a server that is `up` now; the health it moves to, if it moves.
    fn record(&mut self, up: bool, ok: bool, check: &HealthCheck) -> Option<bool> {
        if self.seen_up && !up {
            // Taken down since the last check (passive ejection): it needs `rise` passes from
            // now, not the ones it had before.
            self.passed = 0;
        }
        let moved = self.count(up, ok, check);
        self.seen_up = moved.unwrap_or(up);
        moved
    }

    fn count(&mut self, up: bool, ok: bool, check: &HealthCheck) -> Option<bool> {
        if ok {
            self.failed = 0;
            self.passed = self.passed.saturating_add(1);
            (!up && self.passed >= check.rise).then_some(true)
        } else {
            self.passed = 0;
            self.failed = self.failed.saturating_add(1);
            (up && self.failed >= check.fall).then_some(false)
        }
    }
}

/// One check; `Err` says why it failed, in the words the stats show. A server with `tls:` is
/// checked over TLS (a TCP check is then a TLS handshake), as HAProxy checks an `ssl` server;
/// one with `send_proxy` gets its PROXY header first.
async fn probe(server: &Server, kind: &CheckKind, limit: Duration) -> Result<(), String> {
    let addr = server.address;
    let attempt = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // A server that expects a PROXY header from lb's flows expects one from its checks
        // too (HAProxy's default); a check has no client: v1 UNKNOWN, v2 LOCAL.
        if let Some(version) = server.send_proxy {
            tcp.write_all(crate::proxy_header::check_header(version))
                .await
                .map_err(|e| format!("send PROXY header: {e}"))?;
        }
        let mut stream = match &server.tls {
            None => Stream::Tcp(tcp),
            Some(tls) => {
                let secured = crate::tls::connect::handshake(tls, tcp, limit)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Stream::Tls(Box::new(secured.into()))
            }
        };
        let CheckKind::Http { path, expect_status } = kind else {
            return Ok(());
        };
        // The name TLS asks for, when there is one: a server with name-based hosts answers it.
        let host = match server.tls.as_ref().map(|t| &t.name) {
            Some(rustls::pki_types::ServerName::DnsName(name)) => name.as_ref().to_string(),
            _ => addr.to_string(),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health-check\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        stream.flush().await.map_err(|e| format!("send: {e}"))?;
        let status = read_status(&mut stream).await?;
        let good = match expect_status {
            Some(want) => status == *want,
            None => (200..400).contains(&status),
        };
        if good {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(limit))),
    }
}

/// Reads a response head and returns its status (the head checked as strictly as any
/// response lb forwards).
async fn read_status(stream: &mut Stream) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        match crate::http::response::analyze(&buf, "GET", MAX_HEAD, crate::http::request::DEFAULT_MAX_HEADERS)
        {
            Ok(Some(resp)) if resp.is_interim() => {
                buf.drain(..resp.head_len);
            }
            Ok(Some(resp)) => return Ok(resp.status),
            Ok(None) => {}
            Err(r) => return Err(format!("malformed response: {}", r.why)),
        }
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a response head".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::server;

    fn check(rise: u32, fall: u32) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise,
            fall,
        }
    }

    #[test]
    fn fall_failures_take_it_down_and_rise_successes_bring_it_back() {
        let c = check(2, 3);
        let mut run = Run::default();
        assert_eq!(run.record(true, false, &c), None);
        assert_eq!(run.record(true, false, &c), None);
        // A success breaks the run.
        assert_eq!(run.record(true, true, &c), None);
        assert_eq!(run.record(true, false, &c), None);
        assert_eq!(run.record(true, false, &c), None);
        assert_eq!(run.record(true, false, &c), Some(false));
        assert_eq!(run.record(false, true, &c), None);
        assert_eq!(run.record(false, false, &c), None);
        assert_eq!(run.record(false, true, &c), None);
        assert_eq!(run.record(false, true, &c), Some(true));
        // Ejected by live traffic while the checks pass: back after `rise` more, not at once.
        let mut run = Run::default();
        assert_eq!(run.record(true, true, &c), None);
        assert_eq!(run.record(true, true, &c), None);
        assert_eq!(run.record(false, true, &c), None);
        assert_eq!(run.record(false, true, &c), Some(true));
    }

    async fn answering(answer: &'static [u8]) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn probes() {
        let limit = Duration::from_secs(5);
        let http = |expect_status| CheckKind::Http {
            path: "/health".into(),
            expect_status,
        };
        let ok = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let unavailable = answering(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n").await;
        let garbage = answering(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        assert_eq!(probe(&server(ok), &CheckKind::Tcp, limit).await, Ok(()));
        assert_eq!(probe(&server(ok), &http(None), limit).await, Ok(()));
        assert_eq!(
            probe(&server(ok), &http(Some(204)), limit).await,
            Err("status 200".into())
        );
        assert_eq!(
            probe(&server(unavailable), &http(None), limit).await,
            Err("status 503".into())
        );
        assert!(probe(&server(garbage), &http(None), limit)
            .await
            .unwrap_err()
            .starts_with("malformed response"));
        // A closed port.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(probe(&server(closed), &CheckKind::Tcp, limit)
            .await
            .unwrap_err()
            .starts_with("connect:"));
        // Accepts, never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let short = Duration::from_millis(200);
        assert_eq!(
            probe(&server(silent.local_addr().unwrap()), &http(None), short).await,
            Err("no answer within 200ms".into())
        );
    }
}
