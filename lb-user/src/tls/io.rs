//! The socket under a TLS session, as rustls reads it.
//!
//! A session that may be handed to the kernel afterwards ([`super::ktls`]) is read whole
//! records at a time during its handshake: a read never goes past the end of the record it is
//! in. Without that, rustls could hold the first part of the record after the client's
//! Finished (its request, often sent in the same flight), which the kernel would then never
//! see, and the session could not be handed over. Reads are plain again once the
//! handshake is over or the session stays with rustls ([`TlsIo::plain_reads`]).
use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// A TLS record's header: content type, version, length.
const HEADER: usize = 5;

/// Where the reads are in the peer's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// As much as the socket has.
    Plain,
    /// `got` bytes of the next record's header read.
    Header { header: [u8; HEADER], got: usize },
    /// `left` bytes of the current record's body to read.
    Body { left: usize },
}

/// Before a record's header: nothing of it read.
const NEXT_RECORD: Reads = Reads::Header {
    header: [0; HEADER],
    got: 0,
};

/// A TCP socket, read at record boundaries while [`Reads`] says so.
#[derive(Debug)]
pub struct TlsIo {
    tcp: TcpStream,
    reads: Reads,
}

impl TlsIo {
    /// Reads as much as the socket has.
    pub fn plain(tcp: TcpStream) -> TlsIo {
        TlsIo {
            tcp,
            reads: Reads::Plain,
        }
    }

    /// Reads stop at the end of each record.
    pub fn whole_records(tcp: TcpStream) -> TlsIo {
        TlsIo {
            tcp,
            reads: NEXT_RECORD,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// Whether everything read so far ends at a record boundary: rustls holds no part of a
    /// record. Always false once reads are plain (nothing tells any more).
    pub fn at_record_boundary(&self) -> bool {
        matches!(self.reads, Reads::Header { got: 0, .. })
    }

    /// Reads as much as the socket has from now on: the session stays with rustls.
    pub fn plain_reads(&mut self) {
        self.reads = Reads::Plain;
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.reads {
            Reads::Plain => Pin::new(&mut this.tcp).poll_read(cx, buf),
            Reads::Header { header, got } => {
                // The header is read into its own buffer first, so that the body's length is
                // known before any of it is read; then handed over whole.
                while *got < HEADER {
                    let mut rest = ReadBuf::new(&mut header[*got..]);
                    ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut rest))?;
                    let n = rest.filled().len();
                    if n == 0 {
                        // End of stream within a header: what there is, then end of stream
                        // (rustls reports the cut).
                        let partial = &header[..*got];
                        let n = partial.len().min(buf.remaining());
                        buf.put_slice(&partial[..n]);
                        this.reads = Reads::Plain;
                        return Poll::Ready(Ok(()));
                    }
                    *got += n;
                }
                if buf.remaining() < HEADER {
                    // rustls always offers more room than this; a smaller buffer could not take
                    // the header whole: an error rather than lost bytes.
                    return Poll::Ready(Err(io::Error::other(
                        "TLS read buffer smaller than a record header",
                    )));
                }
                buf.put_slice(&header[..]);
                let left = u16::from_be_bytes([header[3], header[4]]) as usize;
                this.reads = if left == 0 {
                    NEXT_RECORD
                } else {
                    Reads::Body { left }
                };
                Poll::Ready(Ok(()))
            }
            Reads::Body { left } => {
                let want = (*left).min(buf.remaining());
                let mut part = buf.take(want);
                ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut part))?;
                let n = part.filled().len();
                // SAFETY: `part` is the start of `buf`'s unfilled part, and `n` bytes of it were
                // written by the read.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                if n == 0 {
                    this.reads = Reads::Plain;
                } else if n == *left {
                    this.reads = NEXT_RECORD;
                } else {
                    *left -= n;
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for TlsIo {
    // rustls's records, as they are.
    writes_to_tcp!();

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Three records (one empty) arrive in one segment, with a fourth's first bytes: each read
    /// ends at a record's end, and the partial one is not read past what arrived.
    #[tokio::test]
    async fn reads_stop_at_record_ends() {
        let (mut peer, ours) = crate::test_support::loopback_pair().await;
        let record = |body: &[u8]| {
            let mut r = vec![23, 3, 3];
            r.extend((body.len() as u16).to_be_bytes());
            r.extend(body);
            r
        };
        let (a, b, c) = (record(b"first"), record(b""), record(&[7; 300]));
        let next = record(b"fourth");
        let mut wire = [a.clone(), b.clone(), c.clone(), next[..7].to_vec()].concat();
        peer.write_all(&wire).await.unwrap();
        let mut io = TlsIo::whole_records(ours);
        let mut got: Vec<u8> = Vec::new();
        let mut boundaries = Vec::new();
        while got.len() < a.len() + b.len() + c.len() + 7 {
            let mut buf = [0u8; 4096];
            let n = io.read(&mut buf).await.unwrap();
            got.extend(&buf[..n]);
            boundaries.push((got.len(), io.at_record_boundary()));
        }
        assert_eq!(got, wire);
        let ends = [a.len(), a.len() + b.len(), a.len() + b.len() + c.len()];
        for end in ends {
            assert!(
                boundaries.contains(&(end, true)),
                "no read ended at {end}: {boundaries:?}"
            );
        }
        assert!(
            !io.at_record_boundary(),
            "mid-record after the fourth's first bytes"
        );
        // The rest of the fourth record completes it.
        peer.write_all(&next[7..]).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = io.read(&mut buf).await.unwrap();
        wire.extend(&buf[..n]);
        assert_eq!(&buf[..n], &next[7..]);
        assert!(io.at_record_boundary());
    }
}
