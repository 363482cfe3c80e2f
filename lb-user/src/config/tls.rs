//! The TLS settings of the configuration, validated: a listener's `tls:` (its certificates
//! loaded and checked, so `lb check` names a missing, unreadable, expired or mismatched file)
//! and the `tls:` of a backend and its servers (merged key by key).
use super::{
    locate::Step,
    raw::{RawCertFiles, RawListenerTls, RawServerTls, RawServerTlsSettings},
    with, Validator,
};
use crate::tls::{
    accept::load_set,
    certs::{CertError, CertFiles, CertSet},
    connect::{client_config, ServerTls},
    MinVersion,
};
use rustls::pki_types::ServerName;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub(super) const DEFAULT_HANDSHAKE: Duration = Duration::from_secs(10);

/// What a TLS client configuration is built from: `ca`, `verify`, `client_cert`.
pub(super) type ClientKey = (Option<PathBuf>, bool, Option<CertFiles>);

/// A listener's `tls:`.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub certificates: Vec<CertFiles>,
    /// The certificates as loaded when the configuration was read.
    pub certs: Arc<CertSet>,
    pub strict_sni: bool,
    /// ALPN protocols offered, preferred first.
    pub alpn: Vec<Vec<u8>>,
    pub min_version: MinVersion,
    /// `timeouts.tls_handshake`.
    pub handshake_timeout: Duration,
    /// Sessions go to the kernel's TLS after the handshake, where it has it.
    pub ktls: bool,
}

impl Validator<'_> {
    /// A path in the configuration, relative to the configuration file's directory.
    fn file_path(&self, text: &str) -> PathBuf {
        let p = Path::new(text);
        match Path::new(self.file).parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    fn cert_files(&self, raw: &RawCertFiles) -> CertFiles {
        CertFiles {
            cert: self.file_path(&raw.cert),
            key: self.file_path(&raw.key),
        }
    }

    /// Records a certificate problem at the key (`cert` or `key`) naming the file at fault.
    fn cert_error(&mut self, path: &[Step], files: &CertFiles, prefix: &str, e: &CertError) {
        let key = match e {
            CertError::Read { path, .. } | CertError::Pem { path, .. } if *path == files.key => "key",
            CertError::NoKey { .. } | CertError::BadKey { .. } | CertError::Mismatch { .. } => "key",
            _ => "cert",
        };
        self.error(&with(path, Step::Key(key)), format!("{prefix}{e}"));
    }

    pub(super) fn listener_tls(
        &mut self,
        path: &[Step],
        raw: Option<&RawListenerTls>,
        http: bool,
        handshake_timeout: Option<Duration>,
    ) -> Option<ListenerTls> {
        let raw = raw?;
        let path = with(path, Step::Key("tls"));
        let certificates: Vec<CertFiles> = raw.certificates.iter().map(|c| self.cert_files(c)).collect();
        if certificates.is_empty() {
            self.error(
                &with(&path, Step::Key("certificates")),
                "tls.certificates: at least one certificate is needed",
            );
        }
        let min_version = match raw.min_version.as_deref().map(|v| (v, MinVersion::parse(v))) {
            None => MinVersion::Tls12,
            Some((_, Some(v))) => v,
            Some((text, None)) => {
                self.error(
                    &with(&path, Step::Key("min_version")),
                    format!("tls.min_version: `{text}` is not one lb offers; expected 1.2 or 1.3 (rustls has no older version)"),
                );
                MinVersion::Tls12
            }
        };
        let alpn: Vec<Vec<u8>> = match &raw.alpn {
            Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
            None if http => vec![b"http/1.1".to_vec()],
            None => Vec::new(),
        };
        for (i, p) in alpn.iter().enumerate() {
            let at = with(&with(&path, Step::Key("alpn")), Step::Index(i));
            if p.is_empty() || p.len() > 255 {
                self.error(&at, "tls.alpn: a protocol name is 1 to 255 bytes");
            } else if http && !matches!(p.as_slice(), b"http/1.1" | b"http/1.0") {
                self.error(
                    &at,
                    format!(
                        "tls.alpn: `{}` on an http listener: lb speaks HTTP/1.1 and HTTP/1.0 only",
                        String::from_utf8_lossy(p)
                    ),
                );
            }
        }
        let mut settings = ListenerTls {
            certificates,
            certs: Arc::new(CertSet::new(Vec::new(), true)),
            strict_sni: raw.strict_sni.unwrap_or(false),
            ktls: raw.ktls.unwrap_or(true),
            alpn,
            min_version,
            handshake_timeout: handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE),
        };
        match load_set(&settings) {
            Ok(set) => settings.certs = Arc::new(set),
            Err(errors) => {
                for (i, e) in errors {
                    let entry = with(&with(&path, Step::Key("certificates")), Step::Index(i));
                    let files = settings.certificates[i].clone();
                    self.cert_error(&entry, &files, "tls: ", &e);
                }
            }
        }
        Some(settings)
    }

    /// A server's TLS: the backend's `tls:` with the server's over it, key by key.
    pub(super) fn server_tls(
        &mut self,
        backend_path: &[Step],
        backend: Option<&RawServerTls>,
        server_path: &[Step],
        server: Option<&RawServerTls>,
        address: SocketAddr,
    ) -> Option<ServerTls> {
        let empty = RawServerTlsSettings::default();
        fn settings<'a>(
            t: Option<&'a RawServerTls>,
            empty: &'a RawServerTlsSettings,
        ) -> Option<&'a RawServerTlsSettings> {
            match t {
                None | Some(RawServerTls::Switch(false)) => None,
                Some(RawServerTls::Switch(true)) => Some(empty),
                Some(RawServerTls::Settings(s)) => Some(s),
            }
        }
        // The server's own `tls: false` turns it off; otherwise either block turns it on.
        if matches!(server, Some(RawServerTls::Switch(false))) {
            return None;
        }
        let (b, s) = (settings(backend, &empty), settings(server, &empty));
        if b.is_none() && s.is_none() {
            return None;
        }
        // Each key from the server when it sets it, else from the backend; errors point there.
        let bpath = with(backend_path, Step::Key("tls"));
        let spath = with(server_path, Step::Key("tls"));
        let pick = |f: fn(&RawServerTlsSettings) -> bool| {
            if s.is_some_and(f) {
                (s, spath.clone())
            } else {
                (b, bpath.clone())
            }
        };
        let (from, sni_path) = pick(|t| t.sni.is_some());
        let sni = from.and_then(|t| t.sni.clone());
        let (from, ca_path) = pick(|t| t.ca.is_some());
        let ca = from.and_then(|t| t.ca.as_deref()).map(|c| self.file_path(c));
        let (from, _) = pick(|t| t.verify.is_some());
        let verify = from.and_then(|t| t.verify).unwrap_or(true);
        let (from, cert_path) = pick(|t| t.client_cert.is_some());
        let client_cert = from
            .and_then(|t| t.client_cert.as_ref())
            .map(|c| self.cert_files(c));
        if !verify && ca.is_some() {
            self.error(
                &with(&ca_path, Step::Key("ca")),
                "tls: `ca` with `verify: false` would not be used: remove one of them",
            );
            return None;
        }
        let name = match &sni {
            Some(n) => match ServerName::try_from(n.clone()) {
                Ok(name @ ServerName::DnsName(_)) => name,
                _ => {
                    self.error(
                        &with(&sni_path, Step::Key("sni")),
                        format!("tls.sni: `{n}` is not a DNS name"),
                    );
                    return None;
                }
            },
            None => ServerName::IpAddress(address.ip().into()),
        };
        // Built once for each distinct block (every server of a backend shares its `tls:`), and
        // a bad one reported once.
        let key = (ca.clone(), verify, client_cert.clone());
        if let Some((_, built)) = self.tls_clients.iter().find(|(k, _)| *k == key) {
            return built.clone().map(|config| ServerTls { config, name });
        }
        let built = client_config(
            ca.as_deref(),
            verify,
            client_cert.as_ref(),
            crate::tls::provider(),
        );
        self.tls_clients.push((key, built.as_ref().ok().cloned()));
        match built {
            Ok(config) => Some(ServerTls { config, name }),
            Err(e) => {
                let at = match &e {
                    crate::tls::connect::ServerTlsError::Cert(c)
                        if client_cert.as_ref().is_some_and(|f| c.concerns(f)) =>
                    {
                        with(&cert_path, Step::Key("client_cert"))
                    }
                    _ => with(&ca_path, Step::Key("ca")),
                };
                self.error(&at, format!("tls: {e}"));
                None
            }
        }
    }
}

impl CertError {
    /// Whether the error is about one of these files.
    pub fn concerns(&self, files: &CertFiles) -> bool {
        let path = match self {
            CertError::Read { path, .. }
            | CertError::Pem { path, .. }
            | CertError::NoCertificate { path }
            | CertError::NoKey { path }
            | CertError::BadKey { path, .. }
            | CertError::BadCertificate { path, .. }
            | CertError::Expired { path, .. }
            | CertError::NotYetValid { path, .. }
            | CertError::NoName { path } => path,
            CertError::Mismatch { cert, .. } => cert,
        };
        *path == files.cert || *path == files.key
    }
}
