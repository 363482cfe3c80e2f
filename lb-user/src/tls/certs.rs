//! Certificates a TLS listener presents: loading a PEM certificate chain and its key (every way
//! that can fail, named with the file), and the set a listener picks from by SNI.
use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
    SignatureScheme,
};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

/// One `certificates:` entry: a PEM certificate chain (the server's certificate first) and
/// its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate could not be used; each names its file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: not PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: holds no certificate (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: holds no private key (expected a PKCS#8, PKCS#1 or SEC1 PEM key)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unusable private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{}: not a valid X.509 certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: the certificate expired on {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("{}: the certificate is not valid before {not_before}", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("{}: the private key does not match the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: the certificate's subjectAltName has no DNS name or IP address (clients ignore the CN)", path.display())]
    NoName { path: PathBuf },
}

/// A certificate chain with its signing key, and what lb read from it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// The DNS names of its subjectAltName, lowercase (`*.example.com` for a wildcard).
    pub names: Vec<String>,
    /// Its subjectAltName has an IP address (a certificate for clients that connect by
    /// address: it can only be the default).
    pub has_address: bool,
    /// Its subject, as OpenSSL prints it (for logs and `lb stats`).
    pub subject: String,
    /// When it expires (seconds since the epoch).
    pub not_after: i64,
    pub files: CertFiles,
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.into(),
        source,
    })
}

/// The certificates of a PEM file (a chain, the end entity first), at least one.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: path.into(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate { path: path.into() });
    }
    Ok(chain)
}

/// The private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey { path: path.into() },
        e => CertError::Pem {
            path: path.into(),
            reason: e.to_string(),
        },
    })
}

/// Loads and checks one certificate and key: both readable PEM, the certificate valid `now`
/// (seconds since the epoch), the key usable and matching it.
pub fn load(files: &CertFiles, provider: &CryptoProvider, now: i64) -> Result<Loaded, CertError> {
    let chain = load_chain(&files.cert)?;
    let key = load_key(&files.key)?;
    let bad = |reason: String| CertError::BadCertificate {
        path: files.cert.clone(),
        reason,
    };
    let (_, x509) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| bad(e.to_string()))?;
    let validity = x509.validity();
    if validity.not_after.timestamp() < now {
        return Err(CertError::Expired {
            path: files.cert.clone(),
            not_after: validity.not_after.to_string(),
        });
    }
    if validity.not_before.timestamp() > now {
        return Err(CertError::NotYetValid {
            path: files.cert.clone(),
            not_before: validity.not_before.to_string(),
        });
    }
    // Clients match a name against the subjectAltName only (they ignore the CN): so does lb.
    use x509_parser::extensions::GeneralName;
    let alt_names: Vec<GeneralName<'_>> = match x509.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.clone(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(bad(e.to_string())),
    };
    let names: Vec<String> = alt_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    let has_address = alt_names.iter().any(|n| matches!(n, GeneralName::IPAddress(_)));
    let subject = x509.subject().to_string();
    let not_after = validity.not_after.timestamp();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::BadKey {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::Mismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
        Err(e) => {
            return Err(CertError::BadKey {
                path: files.key.clone(),
                reason: format!("cannot be compared with the certificate's: {e}"),
            })
        }
    }
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        has_address,
        subject,
        not_after,
        files: files.clone(),
    })
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A listener's certificates, indexed by the names they are valid for.
#[derive(Debug)]
pub struct CertSet {
    pub certs: Vec<Loaded>,
    /// Exact names → certificates (in configuration order).
    exact: HashMap<String, Vec<usize>>,
    /// `*.example.com` kept as `example.com` → certificates.
    wildcard: HashMap<String, Vec<usize>>,
    /// Served when the client sends no SNI or a name no certificate has: the first
    /// certificate, unless `strict_sni`.
    default: Option<usize>,
}

impl CertSet {
    pub fn new(certs: Vec<Loaded>, strict_sni: bool) -> CertSet {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, c) in certs.iter().enumerate() {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_default().push(i),
                    None => exact.entry(name.clone()).or_default().push(i),
                }
            }
        }
        let default = (!strict_sni && !certs.is_empty()).then_some(0);
        CertSet {
            certs,
            exact,
            wildcard,
            default,
        }
    }

    /// The certificate for a client that asked for `sni` (lowercase, as rustls hands it over)
    /// and can verify `schemes`: an exact
    /// name first, then a wildcard one level up, then the default. Among certificates for the
    /// same name (an ECDSA and an RSA one, say), the first whose key the client can verify.
    pub fn pick(&self, sni: Option<&str>, schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let named = sni.and_then(|name| {
            self.exact.get(name).or_else(|| {
                let parent = name.split_once('.')?.1;
                self.wildcard.get(parent)
            })
        });
        let i = match named {
            // None usable: the first, and the handshake fails saying why (no common scheme).
            Some(list) => list
                .iter()
                .find(|&&i| self.certs[i].key.key.choose_scheme(schemes).is_some())
                .or(list.first())
                .copied()?,
            None => self.default?,
        };
        Some(self.certs[i].key.clone())
    }
}
