//! The responses lb generates itself: an error status with a short body, after which lb closes
//! the connection.
use super::reason_phrase;

/// `STATUS REASON` as a complete response with `Connection: close`.
pub fn error(status: u16) -> Vec<u8> {
    let reason = reason_phrase(status);
    let body = format!("{status} {reason}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_reply_is_a_complete_response() {
        let reply = super::error(431);
        let head =
            crate::http::response::analyze(&reply, "GET", 4096, crate::http::request::DEFAULT_MAX_HEADERS)
                .unwrap()
                .unwrap();
        assert_eq!(head.status, 431);
        assert_eq!(
            head.body,
            crate::http::framing::Body::Length((reply.len() - head.head_len) as u64)
        );
    }
}
