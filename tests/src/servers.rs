//! In-process test servers on 127.0.0.1.
use std::net::SocketAddr;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
};

use crate::flows::{self, ServerReport};

/// A tokio listener on 127.0.0.1 with room for hundreds of connections at once (see
/// [`crate::peers::bind`]).
pub fn listener() -> TcpListener {
    let l = crate::peers::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    l.set_nonblocking(true).unwrap();
    TcpListener::from_std(l).unwrap()
}

/// Echoes every byte back; passes the client's FIN on once everything is echoed.
pub async fn echo() -> SocketAddr {
    let l = listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Says who it is (sends `id`, one byte), then echoes every byte back until the client closes
/// (a flow the test keeps open without sending is a session lb counts meanwhile).
pub async fn named(id: u8) -> SocketAddr {
    let l = listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(&[id]).await.is_ok() {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// The integrity peer: for each connection, reads the flow header, sends the requested number
/// of seeded random bytes while reading everything the client sends, and reports both sha256s.
pub async fn integrity() -> (SocketAddr, mpsc::UnboundedReceiver<ServerReport>) {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(report) = flows::serve(s).await {
                    let _ = tx.send(report);
                }
            });
        }
    });
    (addr, rx)
}

/// An address where nothing listens: connections are refused.
pub async fn refusing() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A listener that never accepts, with its one-slot backlog already full: the kernel drops
/// further SYNs, so connecting to it hangs until the connector gives up.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

pub async fn black_hole() -> BlackHole {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // Backlog 0 queues one connection; the second fills the SYN path. Each connect is bounded.
    for _ in 0..2 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(std::time::Duration::from_millis(500), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    BlackHole {
        addr,
        _listener: listener,
        _fillers: fillers,
    }
}

/// Accepts one connection and returns it.
pub async fn accept_one(l: &TcpListener) -> TcpStream {
    l.accept().await.unwrap().0
}

/// Reads until end of stream.
pub async fn read_to_end(s: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.unwrap();
    v
}

/// Writes `msg` and reads the same number of bytes back from an echo server (at most 10 s),
/// checking they are the same.
pub async fn echo_round_trip(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(std::time::Duration::from_secs(10), c.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| panic!("no echo of {} bytes within 10 s", msg.len()))
        .unwrap();
    assert_eq!(back, msg, "the echo differs");
}

/// Reads until the connection ends (at most `bound`) and checks it ended with a reset, not a
/// clean end of stream.
pub async fn expect_reset(c: &mut TcpStream, bound: std::time::Duration) {
    let mut rest = Vec::new();
    let r = tokio::time::timeout(bound, c.read_to_end(&mut rest))
        .await
        .expect("connection not closed in time");
    let err = r.expect_err("the connection ended cleanly, not with a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// A WebSocket echo server: every message comes back as it was sent.
pub async fn websocket_echo() -> std::net::SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() || ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}
