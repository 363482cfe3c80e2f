//! TLS fixtures: a private CA and certificates the tests make as they run (rcgen: no key is
//! ever committed), clients that trust that CA (tokio-rustls), and TLS test servers.
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{
    rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore},
    TlsAcceptor, TlsConnector,
};

/// A certificate and key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A private CA, its files in `dir`.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM): what clients trust.
    pub ca_pem: PathBuf,
}

impl Pki {
    /// A new CA named `name`, its certificate written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(&format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_pem,
        }
    }

    /// An ECDSA P-256 certificate for `names` (DNS names or IP addresses; the first is also
    /// the subject's CN), signed by the CA, written to `dir/STEM.pem` and `dir/STEM.key`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> CertFiles {
        self.issue_with(stem, names, |_| {})
    }

    /// [`Pki::issue`], with the parameters changed by `edit` first (validity, say).
    pub fn issue_with(
        &self,
        stem: &str,
        names: &[&str],
        edit: impl FnOnce(&mut CertificateParams),
    ) -> CertFiles {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = dn(names[0]);
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// A client configuration that trusts this CA and offers ALPN `http/1.1`.
    pub fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A client connection, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How tests reach a TLS listener of lb: the name its certificate has, and a client that
/// trusts it.
#[derive(Clone)]
pub struct TlsClient {
    pub name: String,
    pub ca: PathBuf,
    pub config: Arc<ClientConfig>,
}

impl TlsClient {
    /// A TLS connection to `addr`, asking for `self.name`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        connect(addr, &self.name, self.config.clone()).await
    }
}

/// How to reach a listener of lb: plain, or with TLS.
#[derive(Clone)]
pub struct Dialer {
    pub addr: SocketAddr,
    pub tls: Option<TlsClient>,
}

impl Dialer {
    /// A new client connection (its TLS handshake done).
    pub async fn connect(&self) -> Box<dyn Io> {
        match &self.tls {
            None => Box::new(TcpStream::connect(self.addr).await.unwrap()),
            Some(t) => Box::new(t.connect(self.addr).await.expect("TLS handshake with lb")),
        }
    }

    /// Sends `request` on a new connection and reads until lb closes it (at most 10 s);
    /// everything received.
    pub async fn exchange(&self, request: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = self.connect().await;
        s.write_all(request).await.unwrap();
        s.flush().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
        out
    }
}

/// A TLS connection to `addr` asking for `name` (SNI, and the name the certificate must have).
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// The CN of the certificate the server presented on `stream`.
pub fn peer_common_name(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let der = &stream.get_ref().1.peer_certificates().expect("a certificate")[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let cn = cert.subject().iter_common_name().next().expect("a CN");
    cn.as_str().unwrap().to_string()
}

/// A TLS acceptor presenting `files` (for the tests' TLS servers).
pub fn acceptor(files: &CertFiles) -> TlsAcceptor {
    acceptor_verifying(files, None)
}

/// [`acceptor`], asking clients for a certificate signed by `client_ca` (a PEM file) and
/// refusing the handshake without one, when given.
pub fn acceptor_verifying(files: &CertFiles, client_ca: Option<&Path>) -> TlsAcceptor {
    use tokio_rustls::rustls::{
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    TlsAcceptor::from(Arc::new(builder.with_single_cert(chain, key).unwrap()))
}

/// A TLS server on 127.0.0.1 that answers each connection with `body` (once its request head
/// arrived) in an HTTP/1.1 response with `Connection: close`, then closes.
pub async fn https_server(files: &CertFiles, body: &'static str) -> SocketAddr {
    serve_https(acceptor(files), move |_| body.to_string()).await
}

/// A TLS server on 127.0.0.1 that requires a client certificate signed by `client_ca` and
/// answers with `client CN`, the CN of the certificate it got.
pub async fn https_server_requiring_client_cert(files: &CertFiles, client_ca: &Path) -> SocketAddr {
    serve_https(acceptor_verifying(files, Some(client_ca)), |conn| {
        let der = &conn.peer_certificates().expect("a client certificate")[0];
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let cn = cert.subject().iter_common_name().next().expect("a CN");
        format!("client {}", cn.as_str().unwrap())
    })
    .await
}

/// Serves one `Connection: close` response per TLS connection, its body made from the
/// session by `body`.
async fn serve_https(
    acceptor: TlsAcceptor,
    body: impl Fn(&rustls::ServerConnection) -> String + Send + Sync + 'static,
) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = Arc::new(body);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = body(s.get_ref().1);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A listener's `tls:` block (indented as a listener's key) presenting `certs`, the first the
/// default; `extra`: more keys of the block, e.g. `"strict_sni: true"`.
pub fn listener_tls_yaml(certs: &[&CertFiles], extra: &[&str]) -> String {
    let mut y = String::from("    tls:\n      certificates:\n");
    for c in certs {
        y += &format!(
            "        - {{ cert: \"{}\", key: \"{}\" }}\n",
            c.cert.display(),
            c.key.display()
        );
    }
    for e in extra {
        y += &format!("      {e}\n");
    }
    y
}

/// Whether this kernel has kTLS: the TLS ULP is listed once lb asked for it at start (asking
/// loads the module where there is one). With `LB_REQUIRE_KTLS=1` (the kTLS run of `cargo
/// xtask test`, in a virtual machine whose kernel has it) a kernel without it fails the test.
pub fn kernel_has_ktls() -> bool {
    let has = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"));
    assert!(
        has || std::env::var_os("LB_REQUIRE_KTLS").is_none(),
        "LB_REQUIRE_KTLS is set, but this kernel has no kTLS"
    );
    has
}
