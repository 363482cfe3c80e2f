//! The admin endpoint: a small HTTP/1.1 server (hyper) for operators, on its own address
//! (`admin.listen`), beside the data path.
//!
//! - `GET /metrics`: every metric, Prometheus text format;
//! - `GET /stats.json`: the [`crate::stats`] snapshot; `GET /stats`: the stats page;
//! - `POST /servers/BACKEND/SERVER/enable|disable|drain` and
//!   `POST /servers/BACKEND/SERVER/weight/N`: runtime changes, at once, for new flows only
//!   (flows already on a server are never cut);
//! - `POST /reload`: the configuration file read again and applied ([`crate::reload`]);
//! - `POST /upgrade` (body: a binary's path, or empty): a new process replaces this one
//!   ([`crate::upgrade`]).
//!
//! Guarded: with `admin.token` every request must carry it; without, only loopback clients
//! are served (the configuration refuses a non-loopback `admin.listen` without a token).
use http_body_util::Full;
use hyper::{
    body::Bytes, header, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    balance::{Admin, ServerLive},
    runtime::Runtime,
    stats,
};

/// Most a weight may be set to (as in the configuration).
const MAX_WEIGHT: u32 = 256;
/// Admin connections at once: the endpoint shares the process's file descriptors with the
/// data path.
const MAX_CONNECTIONS: usize = 64;
/// The longest request body read (`POST /upgrade`'s path).
const MAX_BODY: usize = 4096;
/// A client has this long to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    rt: Arc<Runtime>,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds or memory: pause instead of spinning on the error.
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let rt = rt.clone();
        connections.spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let rt = rt.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let req = Request::from_parts(parts, ());
                    // Only `POST /upgrade` has a body: the binary's path.
                    let body =
                        if req.method() == Method::POST && req.uri().path().trim_matches('/') == "upgrade" {
                            use http_body_util::BodyExt;
                            http_body_util::Limited::new(body, MAX_BODY)
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .ok()
                        } else {
                            Some(Bytes::new())
                        };
                    Ok::<_, Infallible>(respond(&rt, peer, &req, body).await)
                }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("admin connection: {e}");
            }
            drop(permit);
        });
    }
}

type Answer = (StatusCode, &'static str, String);

/// `body`: the request's (read only where a command takes one); `None`: unreadable or too long.
async fn respond<B>(
    rt: &Runtime,
    peer: SocketAddr,
    req: &Request<B>,
    body: Option<Bytes>,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match guard(rt, peer, req) {
        Err(answer) => answer,
        Ok(()) if req.method() == Method::POST && req.uri().path().trim_matches('/') == "reload" => {
            reload(rt, peer).await
        }
        Ok(()) if req.method() == Method::POST && req.uri().path().trim_matches('/') == "upgrade" => {
            match body {
                Some(path) => upgrade(rt, peer, &path).await,
                None => text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the body names the binary: a path, at most 4 KiB\n",
                ),
            }
        }
        Ok(()) => route(rt, peer, req.method(), req.uri().path()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::UNAUTHORIZED {
        // Lets a browser ask for the token (as the password).
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"lb admin\""),
        );
    }
    resp
}

/// Loopback clients only, or the token when one is set; and no command from another web site.
fn guard<B>(rt: &Runtime, peer: SocketAddr, req: &Request<B>) -> Result<(), Answer> {
    let forbidden = |why| Err(text(StatusCode::FORBIDDEN, why));
    // A browser sends any page's form POST, cross-site, to a loopback address: such a request
    // says where it comes from, and a command is refused unless it comes from the endpoint's
    // own origin (the CLI sends neither field).
    if req.method() == Method::POST && cross_site(req) {
        return forbidden("cross-site requests may not change lb\n");
    }
    let admin = rt.admin();
    let token = admin.as_ref().and_then(|a| a.token.as_deref());
    let Some(token) = token else {
        if !(peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback()) {
            return forbidden("loopback clients only (set admin.token to allow others)\n");
        }
        // A DNS name pointed at 127.0.0.1 (DNS rebinding) would let a web page read the
        // answers: the endpoint is named by address, or as localhost.
        return if host_is_local(req) {
            Ok(())
        } else {
            forbidden("name the admin endpoint by its address (Host)\n")
        };
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(credential);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(text(StatusCode::UNAUTHORIZED, "the admin token is required\n")),
    }
}

/// Whether a browser says the request comes from another origin than the endpoint's own.
fn cross_site<B>(req: &Request<B>) -> bool {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    if header("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none") {
        return true;
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => origin.strip_prefix("http://") != Some(host),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The Host is an IP address or `localhost` (with or without a port).
fn host_is_local<B>(req: &Request<B>) -> bool {
    let Some(host) = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()) else {
        // HTTP/1.0 without Host: no name to rebind.
        return true;
    };
    if host.parse::<SocketAddr>().is_ok() || host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost")
}

/// The token in an `Authorization` value: `Bearer TOKEN`, or Basic with the token as password.
fn credential(value: &str) -> Option<String> {
    if let Some(t) = value.strip_prefix("Bearer ") {
        return Some(t.trim().to_string());
    }
    use base64::Engine;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.1.to_string())
}

/// Compares without stopping at the first difference (the time taken says nothing of how
/// much of a guess was right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn route(rt: &Runtime, peer: SocketAddr, method: &Method, path: &str) -> Answer {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::GET, ["metrics"]) => {
            stats::export_states(rt);
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                rt.shared.metrics.render(rt.shared.kernel.as_ref()),
            )
        }
        (&Method::GET, ["stats.json"]) => json(StatusCode::OK, &stats::snapshot(rt)),
        (&Method::GET, ["stats"]) => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::stats_page::render(&stats::snapshot(rt)),
        ),
        (&Method::GET, [""]) => text(
            StatusCode::OK,
            "lb admin: GET /metrics, /stats, /stats.json; POST /servers/BACKEND/SERVER/{enable,disable,drain,weight/N}, /reload\n",
        ),
        (&Method::POST, ["servers", backend, server, command @ ..]) => {
            change_server(rt, peer, backend, server, command)
        }
        (&Method::GET, _) | (&Method::POST, _) => text(StatusCode::NOT_FOUND, "not found; try GET /\n"),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only\n"),
    }
}

/// `POST /reload`: the configuration file read again and applied ([`crate::reload`]): 200 with
/// what changed, or 422 with every problem (nothing changed).
async fn reload(rt: &Runtime, peer: SocketAddr) -> Answer {
    match crate::reload::ask(&rt.control, "lb reload", Some(peer.to_string())).await {
        Ok(r) => json(StatusCode::OK, &r),
        Err(refused) => json(StatusCode::UNPROCESSABLE_ENTITY, &refused),
    }
}

/// `POST /upgrade` (body: the binary's path, or empty for the one lb was started from): a new
/// process replaces this one ([`crate::upgrade`]); 200 once it serves, or 500 with why it did
/// not (this one goes on).
async fn upgrade(rt: &Runtime, peer: SocketAddr, body: &[u8]) -> Answer {
    let binary = match std::str::from_utf8(body).map(str::trim) {
        Ok("") => None,
        Ok(path) => Some(std::path::PathBuf::from(path)),
        Err(_) => return text(StatusCode::BAD_REQUEST, "the binary's path is not UTF-8\n"),
    };
    match crate::upgrade::ask(&rt.control, "lb upgrade", Some(peer.to_string()), binary).await {
        Ok(u) => json(StatusCode::OK, &u),
        Err(failed) => json(StatusCode::INTERNAL_SERVER_ERROR, &failed),
    }
}

/// Applies a runtime command to one server; answers with its state after.
fn change_server(rt: &Runtime, peer: SocketAddr, backend: &str, server: &str, command: &[&str]) -> Answer {
    let current = rt.current();
    let Some(b) = current.backend(backend) else {
        return error(StatusCode::NOT_FOUND, format!("no backend `{backend}`"));
    };
    let config = &b.config;
    let Some(s) = config.servers.iter().position(|s| s.name == server) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("backend `{backend}` has no server `{server}`"),
        );
    };
    let live: &ServerLive = &b.balancer.servers()[s];
    let done = match command {
        ["enable"] => {
            live.set_admin(Admin::Ready);
            "enabled".to_string()
        }
        ["disable"] => {
            live.set_admin(Admin::Maint);
            "set to maintenance".to_string()
        }
        ["drain"] => {
            live.set_admin(Admin::Drain);
            "set to drain".to_string()
        }
        ["weight", n] => match n.parse::<u32>() {
            Ok(w) if w <= MAX_WEIGHT => {
                live.set_weight(w);
                format!("weight set to {w}")
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("weight `{n}`: expected a number from 0 to {MAX_WEIGHT}"),
                )
            }
        },
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown command; expected enable, disable, drain or weight/N".into(),
            )
        }
    };
    tracing::warn!(backend = %backend, server = %server, admin_client = %peer, "server {done}; now {}", live.state());
    json(StatusCode::OK, &stats::server(b, s))
}

fn text(status: StatusCode, body: &str) -> Answer {
    (status, "text/plain; charset=utf-8", body.to_string())
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Answer {
    match serde_json::to_string_pretty(value) {
        Ok(body) => (status, "application/json", body + "\n"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn error(status: StatusCode, message: String) -> Answer {
    json(status, &serde_json::json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().method(method).uri("/");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn commands_from_other_sites_and_rebound_names_are_told_apart() {
        let post = |h: &[(&str, &str)]| cross_site(&request(Method::POST, h));
        assert!(!post(&[("host", "127.0.0.1:8404")]));
        assert!(!post(&[
            ("host", "127.0.0.1:8404"),
            ("origin", "http://127.0.0.1:8404")
        ]));
        assert!(post(&[
            ("host", "127.0.0.1:8404"),
            ("origin", "https://evil.example")
        ]));
        assert!(post(&[
            ("host", "127.0.0.1:8404"),
            ("sec-fetch-site", "cross-site")
        ]));
        assert!(!post(&[
            ("host", "127.0.0.1:8404"),
            ("sec-fetch-site", "same-origin")
        ]));
        let local = |host| host_is_local(&request(Method::GET, &[("host", host)]));
        assert!(
            local("127.0.0.1:8404") && local("[::1]:8404") && local("localhost:8404") && local("localhost")
        );
        assert!(!local("evil.example:8404") && !local("evil.example"));
    }

    #[test]
    fn credentials() {
        assert_eq!(credential("Bearer abc"), Some("abc".into()));
        // `any:secret`
        assert_eq!(credential("Basic YW55OnNlY3JldA=="), Some("secret".into()));
        assert_eq!(credential("Basic !!"), None);
        assert_eq!(credential("Digest x"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
