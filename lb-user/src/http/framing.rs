//! Message framing (RFC 9112 §6): how many body bytes follow a head.
//!
//! Every request-smuggling attack is a disagreement about this between two parsers, so lb
//! accepts only framings that cannot be read two ways: one Content-Length value (repeated
//! copies must be identical), or a Transfer-Encoding whose final coding is `chunked` (once), and
//! never both. The rest is refused before any byte reaches the other side: requests with 400
//! (413 above `limits.max_body_bytes`), responses with 502.
use super::{is_tchar, trim_ows, Header, Rejection, Version};

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked (see [`super::chunked`]).
    Chunked,
    /// Everything until the sender closes (responses only).
    UntilClose,
}

/// What the headers say about the body, before the message kind decides.
enum Declared {
    Nothing,
    Length(u64),
    /// Transfer-Encoding present; `chunked` is whether `chunked` is the final coding.
    Coded {
        chunked: bool,
    },
}

/// The body of a request. `max_body`: `limits.max_body_bytes` (a larger Content-Length is 413).
pub fn request_body(headers: &[Header], version: Version, max_body: Option<u64>) -> Result<Body, Rejection> {
    let bad = |why| Rejection::new(400, why);
    let body = match declared(headers).map_err(bad)? {
        Declared::Nothing => Body::None,
        Declared::Length(n) => Body::Length(n),
        // HTTP/1.0 has no transfer codings: a 1.0 message with one is framed for somebody else
        // (RFC 9112 §6.1 tells recipients to treat it as faulty).
        Declared::Coded { .. } if version == Version::Http10 => {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"))
        }
        Declared::Coded { chunked: true } => Body::Chunked,
        Declared::Coded { chunked: false } => {
            return Err(bad("Transfer-Encoding whose final coding is not chunked"))
        }
    };
    if let (Body::Length(n), Some(max)) = (body, max_body) {
        if n > max {
            return Err(Rejection::new(413, "Content-Length above limits.max_body_bytes"));
        }
    }
    Ok(body)
}

/// The body of a response with `status`, to a request with `method` (RFC 9112 §6.3).
pub fn response_body(headers: &[Header], status: u16, method: &str) -> Result<Body, Rejection> {
    let declared = declared(headers).map_err(|why| Rejection::new(502, why))?;
    if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Body::None);
    }
    Ok(match declared {
        Declared::Nothing => Body::UntilClose,
        Declared::Length(n) => Body::Length(n),
        Declared::Coded { chunked: true } => Body::Chunked,
        // The sender delimits such a body by closing.
        Declared::Coded { chunked: false } => Body::UntilClose,
    })
}

/// Reads Content-Length and Transfer-Encoding; `Err` when they are malformed or both present.
fn declared(headers: &[Header]) -> Result<Declared, &'static str> {
    let mut length = None;
    let mut codings = None;
    for h in headers {
        if h.is("content-length") {
            for value in h.value.split(|&b| b == b',') {
                let n = parse_length(trim_ows(value))?;
                if length.is_some_and(|l| l != n) {
                    return Err("differing Content-Length values");
                }
                length = Some(n);
            }
        } else if h.is("transfer-encoding") {
            let seen = codings.get_or_insert((0usize, false));
            for coding in h.value.split(|&b| b == b',') {
                let coding = trim_ows(coding);
                if coding.is_empty() {
                    // An empty list element (RFC 9110 §5.6.1): ignored.
                    continue;
                }
                if !coding.iter().all(|&b| is_tchar(b)) {
                    return Err("malformed Transfer-Encoding (parameters or non-token bytes)");
                }
                let chunked = coding.eq_ignore_ascii_case(b"chunked");
                if chunked && seen.1 {
                    return Err("chunked applied twice");
                }
                *seen = (seen.0 + 1, chunked || seen.1);
                if !chunked && seen.1 {
                    return Err("a transfer coding after chunked");
                }
            }
        }
    }
    match (length, codings) {
        (Some(_), Some(_)) => Err("both Content-Length and Transfer-Encoding"),
        (Some(n), None) => Ok(Declared::Length(n)),
        (None, Some((0, _))) => Err("empty Transfer-Encoding"),
        (None, Some((_, chunked))) => Ok(Declared::Coded { chunked }),
        (None, None) => Ok(Declared::Nothing),
    }
}

/// `1*DIGIT`, as a u64.
fn parse_length(value: &[u8]) -> Result<u64, &'static str> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err("malformed Content-Length");
    }
    value
        .iter()
        .try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
        .ok_or("Content-Length too large")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> Vec<Header> {
        list.iter()
            .map(|(n, v)| Header {
                name: n.to_string(),
                value: v.as_bytes().to_vec(),
            })
            .collect()
    }

    fn req(list: &[(&str, &str)]) -> Result<Body, u16> {
        request_body(&headers(list), Version::Http11, Some(1000)).map_err(|r| r.status)
    }

    #[test]
    fn request_framings() {
        assert_eq!(req(&[]), Ok(Body::None));
        assert_eq!(req(&[("Content-Length", "12")]), Ok(Body::Length(12)));
        assert_eq!(
            req(&[("content-length", "12"), ("Content-Length", "12")]),
            Ok(Body::Length(12))
        );
        assert_eq!(req(&[("Content-Length", "12, 12")]), Ok(Body::Length(12)));
        assert_eq!(req(&[("Transfer-Encoding", "chunked")]), Ok(Body::Chunked));
        assert_eq!(req(&[("Transfer-Encoding", "gzip, Chunked")]), Ok(Body::Chunked));
        assert_eq!(
            req(&[("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")]),
            Ok(Body::Chunked)
        );
        assert_eq!(req(&[("Transfer-Encoding", "chunked, ")]), Ok(Body::Chunked));
    }

    #[test]
    fn ambiguous_request_framings_are_refused() {
        for (list, status) in [
            (&[("Content-Length", "12"), ("Content-Length", "13")][..], 400),
            (&[("Content-Length", "12, 13")], 400),
            (&[("Content-Length", "+12")], 400),
            (&[("Content-Length", "1 2")], 400),
            (&[("Content-Length", "0x10")], 400),
            (&[("Content-Length", "")], 400),
            (&[("Content-Length", "99999999999999999999999")], 400),
            (&[("Content-Length", "1001")], 413),
            (&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")], 400),
            (&[("Transfer-Encoding", "chunked"), ("Content-Length", "5")], 400),
            (&[("Transfer-Encoding", "chunked, gzip")], 400),
            (&[("Transfer-Encoding", "chunked, chunked")], 400),
            (
                &[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
                400,
            ),
            (&[("Transfer-Encoding", "identity")], 400),
            (&[("Transfer-Encoding", "xchunked")], 400),
            (&[("Transfer-Encoding", "chunked;q=1")], 400),
            (&[("Transfer-Encoding", "\"chunked\"")], 400),
            (&[("Transfer-Encoding", "")], 400),
        ] {
            assert_eq!(req(list), Err(status), "{list:?}");
        }
        let te = headers(&[("Transfer-Encoding", "chunked")]);
        assert_eq!(
            request_body(&te, Version::Http10, None).map_err(|r| r.status),
            Err(400)
        );
    }

    #[test]
    fn response_framings() {
        let resp = |list: &[(&str, &str)], status, method| {
            response_body(&headers(list), status, method).map_err(|r| r.status)
        };
        assert_eq!(resp(&[], 200, "GET"), Ok(Body::UntilClose));
        assert_eq!(resp(&[("Content-Length", "3")], 200, "GET"), Ok(Body::Length(3)));
        assert_eq!(resp(&[("Content-Length", "3")], 200, "HEAD"), Ok(Body::None));
        assert_eq!(resp(&[("Content-Length", "3")], 304, "GET"), Ok(Body::None));
        assert_eq!(resp(&[], 204, "GET"), Ok(Body::None));
        assert_eq!(resp(&[], 101, "GET"), Ok(Body::None));
        assert_eq!(
            resp(&[("Transfer-Encoding", "chunked")], 200, "GET"),
            Ok(Body::Chunked)
        );
        assert_eq!(
            resp(&[("Transfer-Encoding", "gzip")], 200, "GET"),
            Ok(Body::UntilClose)
        );
        assert_eq!(
            resp(
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
                200,
                "GET"
            ),
            Err(502)
        );
        assert_eq!(resp(&[("Content-Length", "3, 4")], 200, "GET"), Err(502));
    }
}
