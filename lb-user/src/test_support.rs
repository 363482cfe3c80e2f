//! Fixtures shared by the unit tests (compiled for tests only).
use tokio::net::{TcpListener, TcpStream};

/// A connected TCP pair on loopback: (the connecting end, the accepted end).
pub async fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connected = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (accepted, _) = l.accept().await.unwrap();
    (connected, accepted)
}

/// A plain server named `s` at `address`, weight 1, no limit.
pub fn server(address: std::net::SocketAddr) -> crate::config::Server {
    crate::config::Server {
        name: "s".into(),
        address,
        weight: 1,
        maxconn: None,
        tls: None,
        send_proxy: None,
    }
}
