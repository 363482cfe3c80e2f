//! The response analyzer (HAProxy's `http_lb_resp`): decides whether the bytes a server sent
//! form a complete, acceptable response head. The same strictness as for requests; what a
//! server gets wrong is answered to the client with 502 instead of being passed on.
use super::{check_line_endings, framing, framing::Body, owned_headers, Header, Rejection, Version};

use super::request::MAX_MAX_HEADERS;

/// An accepted response head.
#[derive(Debug, Clone)]
pub struct Response {
    pub version: Version,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<Header>,
    /// Bytes of the head, final CRLF included.
    pub head_len: usize,
    pub body: Body,
}

impl Response {
    /// An interim response (1xx other than 101): another head follows it.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Analyzes the bytes a server sent in answer to a `method` request: `Ok(None)` while the head
/// is incomplete and under `max_header_bytes`; at most `max_fields` header fields.
pub fn analyze(
    buf: &[u8],
    method: &str,
    max_header_bytes: usize,
    max_fields: usize,
) -> Result<Option<Response>, Rejection> {
    let bad = |why| Rejection::new(502, why);
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    // The default configuration, as `Response::parse` (none of httparse's leniency options).
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields[..max_fields.min(MAX_MAX_HEADERS)],
    );
    check_line_endings(buf, &parsed).map_err(bad)?;
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) if n <= max_header_bytes => n,
        Ok(httparse::Status::Partial) if buf.len() < max_header_bytes => return Ok(None),
        Ok(_) => return Err(bad("response head above limits.max_header_bytes")),
        Err(httparse::Error::TooManyHeaders) => return Err(bad("too many header fields in the response")),
        Err(_) => return Err(bad("malformed response head")),
    };
    let (Some(minor), Some(status)) = (resp.version, resp.code) else {
        return Err(bad("malformed status line"));
    };
    if !(100..=599).contains(&status) {
        return Err(bad("status code out of range"));
    }
    let headers = owned_headers(resp.headers);
    let body = framing::response_body(&headers, status, method)?;
    Ok(Some(Response {
        version: if minor == 0 {
            Version::Http10
        } else {
            Version::Http11
        },
        status,
        reason: resp.reason.unwrap_or("").to_string(),
        headers,
        head_len,
        body,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_limit_holds_for_responses() {
        let head = format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 0\r\n\r\n",
            "X: y\r\n".repeat(100)
        );
        let fields = |max| {
            analyze(head.as_bytes(), "GET", 8192, max)
                .map(|r| r.is_some())
                .map_err(|r| r.status)
        };
        assert_eq!(fields(100), Err(502));
        assert_eq!(fields(101), Ok(true));
    }

    fn status(head: &str, method: &str) -> Result<Option<(u16, Body)>, u16> {
        analyze(head.as_bytes(), method, 1024, 100)
            .map(|r| r.map(|r| (r.status, r.body)))
            .map_err(|r| r.status)
    }

    #[test]
    fn accepted_responses() {
        assert_eq!(
            status("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", "GET"),
            Ok(Some((200, Body::Length(2))))
        );
        assert_eq!(
            status("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "HEAD"),
            Ok(Some((200, Body::None)))
        );
        assert_eq!(
            status("HTTP/1.0 200 \r\n\r\n", "GET"),
            Ok(Some((200, Body::UntilClose)))
        );
        assert_eq!(
            status(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                "GET"
            ),
            Ok(Some((101, Body::None)))
        );
        assert_eq!(status("HTTP/1.1 200 OK\r\nContent-Len", "GET"), Ok(None));
        let interim = analyze(b"HTTP/1.1 100 Continue\r\n\r\n", "POST", 1024, 100)
            .unwrap()
            .unwrap();
        assert!(interim.is_interim());
    }

    #[test]
    fn malformed_responses_are_502() {
        for head in [
            "HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 999 Odd\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            "ICY 200 OK\r\n\r\n",
        ] {
            assert_eq!(status(head, "GET"), Err(502), "{head:?}");
        }
        let long = format!("HTTP/1.1 200 OK\r\nX: {}\r\n", "y".repeat(2000));
        assert_eq!(status(&long, "GET"), Err(502));
    }
}
