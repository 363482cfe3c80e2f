//! The admin endpoint: a small HTTP/1.1 server (hyper) for operators, on its own address
//! (`admin.listen`), beside the data path.
//!
//! - `GET /metrics`: every metric, Prometheus text format;
//! - `GET /stats.json`: the [`crate::stats`] snapshot; `GET /stats`: the stats page;
//! - `POST /servers/BACKEND/SERVER/enable|disable|drain` and
//!   `POST /servers/BACKEND/SERVER/weight/N`: runtime changes, at once, for new flows only
//!   (flows already on a server are never cut).
//!
//! Guarded: with `admin.token` every request must carry it; without, only loopback clients
//! are served (the configuration refuses a non-loopback `admin.listen` without a token).
use http_body_util::Full;
use hyper::{
    body::Bytes, header, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use std::{convert::Infallible, net::SocketAddr, sync::Arc};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    balance::{Admin, ServerLive},
    server::Proxy,
    stats,
};

/// Most a weight may be set to (as in the configuration).
const MAX_WEIGHT: u32 = 256;

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    continue;
                }
            },
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(respond(&proxy, peer, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("admin connection: {e}");
            }
        });
    }
}

type Answer = (StatusCode, &'static str, String);

fn respond<B>(proxy: &Proxy, peer: SocketAddr, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match guard(proxy, peer, req) {
        Err(answer) => answer,
        Ok(()) => route(proxy, peer, req.method(), req.uri().path()),
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

/// Loopback clients only, or the token when one is set.
fn guard<B>(proxy: &Proxy, peer: SocketAddr, req: &Request<B>) -> Result<(), Answer> {
    let token = proxy.config.admin.as_ref().and_then(|a| a.token.as_deref());
    let Some(token) = token else {
        return if peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback() {
            Ok(())
        } else {
            Err(text(
                StatusCode::FORBIDDEN,
                "loopback clients only (set admin.token to allow others)\n",
            ))
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

fn route(proxy: &Proxy, peer: SocketAddr, method: &Method, path: &str) -> Answer {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::GET, ["metrics"]) => {
            stats::export_states(proxy);
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                proxy.metrics.render(proxy.kernel.as_ref()),
            )
        }
        (&Method::GET, ["stats.json"]) => json(StatusCode::OK, &stats::snapshot(proxy)),
        (&Method::GET, ["stats"]) => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::stats_page::render(&stats::snapshot(proxy)),
        ),
        (&Method::GET, [""]) => text(
            StatusCode::OK,
            "lb admin: GET /metrics, /stats, /stats.json; POST /servers/BACKEND/SERVER/{enable,disable,drain,weight/N}\n",
        ),
        (&Method::POST, ["servers", backend, server, command @ ..]) => {
            change_server(proxy, peer, backend, server, command)
        }
        (&Method::GET, _) | (&Method::POST, _) => text(StatusCode::NOT_FOUND, "not found; try GET /\n"),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only\n"),
    }
}

/// Applies a runtime command to one server; answers with its state after.
fn change_server(proxy: &Proxy, peer: SocketAddr, backend: &str, server: &str, command: &[&str]) -> Answer {
    let Some(b) = proxy.config.backends.iter().position(|b| b.name == backend) else {
        return error(StatusCode::NOT_FOUND, format!("no backend `{backend}`"));
    };
    let config = &proxy.config.backends[b];
    let Some(s) = config.servers.iter().position(|s| s.name == server) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("backend `{backend}` has no server `{server}`"),
        );
    };
    let live: &ServerLive = &proxy.backends[b].balancer.servers()[s];
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
    let snapshot = stats::snapshot(proxy);
    json(StatusCode::OK, &snapshot.backends[b].servers[s])
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
