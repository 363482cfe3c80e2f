//! The chunked body checker (RFC 9112 §7.1): follows a chunked body as it streams past, so lb
//! forwards it unchanged, knows where it ends (the next pipelined request starts there), and
//! refuses what a server could read differently: malformed or overflowing sizes, stray bytes
//! in extensions, bare CR or LF, obs-folded or malformed trailers.
use super::{is_ows, is_tchar};

/// Longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_SIZE_LINE: usize = 4096;
/// Most bytes of trailer fields accepted.
const MAX_TRAILERS: usize = 16 * 1024;

/// Where in the chunked body the next byte falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size (`digits` so far).
    Size {
        digits: u8,
    },
    /// Whitespace after the size: only an extension (`;`) may follow.
    SizeBws,
    /// After `;`: BWS, then the extension's name.
    ExtNameStart,
    ExtName,
    /// Whitespace after a name: `=` or another `;` must follow.
    NameBws,
    /// After `=`: BWS, then a token or a quoted string.
    ExtValueStart,
    ExtValue,
    Quoted,
    QuotedEscape,
    /// Just after a quoted value: `;`, whitespace or CR.
    AfterQuoted,
    /// Whitespace after a value: only another extension (`;`) may follow.
    ValueBws,
    /// The LF of the size line.
    SizeLf,
    /// Chunk data (`left` bytes to go).
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// The start of a trailer line, or the final CRLF.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// A malformed chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

/// Follows one chunked body.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    /// The size being read, then the current chunk's size.
    size: u64,
    /// Bytes of the current size line, or of the trailers so far.
    line: usize,
    /// Data bytes so far (without framing).
    data: u64,
    /// The last bytes fed that must not be forwarded yet: the size line under way (until its
    /// LF says whether it is the last chunk), and from the last chunk's size line on, all of
    /// it until the final CRLF. See [`Chunked::withheld`].
    pending: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
            data: 0,
            pending: 0,
        }
    }
}

impl Chunked {
    /// Follows `bytes`, the body's next bytes; returns how many belong to it. When that is less
    /// than `bytes.len()`, or [`Chunked::done`], the body ended there.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < bytes.len() && self.state != State::Done {
            if let State::Data { left } = self.state {
                // The bulk of a body: skip it at once.
                let n = left.min((bytes.len() - i) as u64);
                i += n as usize;
                self.data += n;
                self.state = if n == left {
                    State::DataCr
                } else {
                    State::Data { left: left - n }
                };
                continue;
            }
            self.step(bytes[i])?;
            i += 1;
        }
        Ok(i)
    }

    /// The body, trailers and final CRLF included, is complete.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Data bytes so far, without the chunk framing (what `limits.max_body_bytes` bounds).
    pub fn data_bytes(&self) -> u64 {
        self.data
    }

    /// How many of the last bytes fed must be held back, not forwarded yet. A receiver that
    /// got the last chunk (`0\r\n`) and then a close may take the body for complete (Python's
    /// http.client does): so the last chunk and the trailers go only together with the final
    /// CRLF, once all of it was checked, and a size line only once whole. Cut before, the
    /// receiver sees a body without its end.
    pub fn withheld(&self) -> usize {
        if self.done() {
            0
        } else {
            self.pending
        }
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use State::*;
        let in_size_line = matches!(
            self.state,
            Size { .. }
                | SizeBws
                | ExtNameStart
                | ExtName
                | NameBws
                | ExtValueStart
                | ExtValue
                | Quoted
                | QuotedEscape
                | AfterQuoted
                | ValueBws
                | SizeLf
        );
        if in_size_line {
            self.pending += 1;
            self.line += 1;
            if self.line > MAX_SIZE_LINE {
                return Err(ChunkError("chunk-size line too long"));
            }
        } else if matches!(
            self.state,
            TrailerStart | TrailerName | TrailerValue | TrailerLf | EndLf
        ) {
            self.pending += 1;
            self.line += 1;
            if self.line > MAX_TRAILERS {
                return Err(ChunkError("trailers too long"));
            }
        }
        self.state = match (self.state, b) {
            (Size { digits }, b) if b.is_ascii_hexdigit() => {
                let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(ChunkError("chunk size overflows"))?;
                Size {
                    digits: digits.saturating_add(1),
                }
            }
            (Size { digits: 0 }, _) => return Err(ChunkError("chunk size is not hex")),
            // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ) (RFC 9112 §7.1.1):
            // whitespace only around `;` and `=`, never before the CRLF.
            (Size { .. } | SizeBws, b) if is_ows(b) => SizeBws,
            (Size { .. } | SizeBws | ExtName | NameBws | ExtValue | AfterQuoted | ValueBws, b';') => {
                ExtNameStart
            }
            (Size { .. } | ExtName | ExtValue | AfterQuoted, b'\r') => SizeLf,
            (ExtNameStart, b) if is_ows(b) => ExtNameStart,
            (ExtNameStart | ExtName, b) if is_tchar(b) => ExtName,
            (ExtName | NameBws, b) if is_ows(b) => NameBws,
            (ExtName | NameBws, b'=') => ExtValueStart,
            (ExtValueStart, b) if is_ows(b) => ExtValueStart,
            (ExtValueStart, b'"') => Quoted,
            (ExtValueStart | ExtValue, b) if is_tchar(b) => ExtValue,
            (ExtValue | AfterQuoted | ValueBws, b) if is_ows(b) => ValueBws,
            (Quoted, b'"') => AfterQuoted,
            (Quoted, b'\\') => QuotedEscape,
            (Quoted, b) if is_qdtext(b) => Quoted,
            (QuotedEscape, b) if b == b'\t' || b == b' ' || is_vchar_or_obs(b) => Quoted,
            (SizeLf, b'\n') => {
                self.line = 0;
                if self.size == 0 {
                    TrailerStart
                } else {
                    // A chunk with data: its size line may go.
                    self.pending = 0;
                    Data { left: self.size }
                }
            }
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => {
                self.size = 0;
                Size { digits: 0 }
            }
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart | TrailerName, b) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, b) if b == b'\t' || b == b' ' || is_vchar_or_obs(b) => TrailerValue,
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => Done,
            (TrailerStart, b) if is_ows(b) => return Err(ChunkError("obs-fold in trailers")),
            (SizeLf | DataLf | TrailerLf | EndLf, _) => return Err(ChunkError("CR without LF")),
            (DataCr, _) => return Err(ChunkError("chunk data longer than its size")),
            (_, b'\n') => return Err(ChunkError("bare LF")),
            (Size { .. }, _) => return Err(ChunkError("chunk size is not hex")),
            _ => return Err(ChunkError("malformed chunk extension or trailer")),
        };
        Ok(())
    }
}

fn is_vchar_or_obs(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// `qdtext` (RFC 9110 §5.6.4): what a quoted string holds unescaped.
fn is_qdtext(b: u8) -> bool {
    b == b'\t'
        || b == b' '
        || b == 0x21
        || (0x23..=0x5b).contains(&b)
        || (0x5d..=0x7e).contains(&b)
        || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` one byte at a time and all at once; both must agree.
    fn check(body: &[u8]) -> Result<(usize, u64), ChunkError> {
        let mut whole = Chunked::default();
        let n = whole.feed(body)?;
        assert!(whole.done(), "incomplete: {:?}", String::from_utf8_lossy(body));
        let mut bytewise = Chunked::default();
        let mut taken = 0;
        for b in body {
            taken += bytewise.feed(std::slice::from_ref(b))?;
            if bytewise.done() {
                break;
            }
        }
        assert_eq!((taken, bytewise.data_bytes()), (n, whole.data_bytes()));
        Ok((n, whole.data_bytes()))
    }

    #[test]
    fn well_formed_bodies() {
        assert_eq!(check(b"0\r\n\r\n"), Ok((5, 0)));
        assert_eq!(check(b"5\r\nhello\r\n0\r\n\r\n"), Ok((15, 5)));
        assert_eq!(check(b"A\r\n0123456789\r\n000\r\n\r\n"), Ok((22, 10)));
        assert_eq!(
            check(b"5;name=value;flag ; q=\"a \\\"b\"\r\nhello\r\n0\r\n\r\n"),
            Ok((43, 5))
        );
        assert_eq!(
            check(b"3\r\nabc\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n"),
            Ok((39, 3))
        );
    }

    #[test]
    fn the_last_chunk_is_held_back_until_the_body_ends() {
        let mut c = Chunked::default();
        // A size line goes only once whole; a chunk's data at once.
        assert_eq!((c.feed(b"5\r"), c.withheld()), (Ok(2), 2));
        assert_eq!((c.feed(b"\nhel"), c.withheld()), (Ok(4), 0));
        assert_eq!((c.feed(b"lo\r\n0"), c.withheld()), (Ok(5), 1));
        // The last chunk and the trailers wait for the final CRLF, byte by byte or at once.
        assert_eq!((c.feed(b"\r\nX-Sum: 1\r\n"), c.withheld()), (Ok(12), 13));
        assert_eq!((c.feed(b"\r"), c.withheld()), (Ok(1), 14));
        assert_eq!((c.feed(b"\n"), c.withheld()), (Ok(1), 0));
        assert!(c.done());
    }

    #[test]
    fn what_follows_the_body_is_not_taken() {
        let mut c = Chunked::default();
        assert_eq!(c.feed(b"2\r\nab\r\n0\r\n\r\nGET / HTTP/1.1\r\n"), Ok(12));
        assert!(c.done());
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for body in [
            &b"\r\n"[..],
            b"x\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\rxhello",
            b"10000000000000000\r\n",
            b"5;\r\nhello\r\n",
            b"5;a=\"x\r\n",
            b"5;a=b c\r\n",
            b"5 6\r\n",
            b"0\r\n field: x\r\n\r\n",
            b"0\r\nbad name: x\r\n\r\n",
            b"0\r\nname: x\n\r\n",
            b"0\r\n\n",
            b"5;a=\"x\"=y\r\n",
            b"5;a=b =c\r\n",
            b"5 \r\n",
            b"5;a \r\n",
            b"5;a=b \r\n",
        ] {
            let mut c = Chunked::default();
            assert!(
                c.feed(body).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
