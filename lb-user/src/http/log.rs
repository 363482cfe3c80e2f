//! The access log (target `lb::access`): one record per HTTP exchange, and one more when a
//! tunnel ends, as a text line (the default) or a JSON object (`access_log: json`).
use std::net::SocketAddr;

/// How a listener writes its access log (`access_log:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Format {
    Text,
    Json,
    Off,
}

/// One exchange (or one tunnel's end).
pub struct Record<'a> {
    pub client: SocketAddr,
    pub listener: &'a str,
    pub method: &'a str,
    /// Lowercase, without port; `-` when the request named none.
    pub host: &'a str,
    pub target: &'a str,
    pub status: u16,
    /// Bytes received from the client (head and body) and sent to it.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes the kernel forwarded (a tunnel's, both ways).
    pub kernel_bytes: u64,
    pub backend: &'a str,
    /// `-` before a server was chosen.
    pub server: &'a str,
    /// Milliseconds, -1 when not reached: waiting for the request head, connecting (0 on a
    /// kept connection), from the request sent to the response head, the whole exchange.
    pub times: [i64; 4],
    /// Why the exchange ended early, `tunnel` at a hand-off, `tunnel closed` at its end.
    pub note: &'a str,
}

/// Whether records in `format` would be written at all (the format is not `off` and the log
/// filter lets `lb::access` through): when not, callers skip building them.
pub fn wanted(format: Format) -> bool {
    format != Format::Off && tracing::enabled!(target: "lb::access", tracing::Level::INFO)
}

/// Writes `record` in `format`.
pub fn emit(format: Format, r: &Record<'_>) {
    let [request, connect, response, total] = r.times;
    match format {
        Format::Off => {}
        Format::Text => tracing::info!(
            target: "lb::access",
            "{} {} \"{} {} {}\" {} in={} out={} kernel={} server={}/{} t={}/{}/{}/{} {}",
            r.client,
            r.listener,
            r.method,
            r.host,
            r.target,
            r.status,
            r.bytes_in,
            r.bytes_out,
            r.kernel_bytes,
            r.backend,
            r.server,
            request,
            connect,
            response,
            total,
            r.note
        ),
        Format::Json => {
            let record = serde_json::json!({
                "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                "client": r.client.to_string(),
                "listener": r.listener,
                "method": r.method,
                "host": r.host,
                "target": r.target,
                "status": r.status,
                "bytes_in": r.bytes_in,
                "bytes_out": r.bytes_out,
                "kernel_bytes": r.kernel_bytes,
                "backend": r.backend,
                "server": r.server,
                "time_request_ms": request,
                "time_connect_ms": connect,
                "time_response_ms": response,
                "time_total_ms": total,
                "note": r.note,
            });
            tracing::info!(target: "lb::access", "{record}");
        }
    }
}
