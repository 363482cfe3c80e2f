//! The keys lb would give the kernel, checked against real rustls clients: the next record the
//! client sends opens with the receive keys, and a record sealed with the send keys is read by
//! the client, for each cipher the kernel implements, in TLS 1.3 and 1.2. (This kernel has no
//! kTLS: `cargo xtask test-ktls` runs the hand-off itself in a virtual machine that does.)
use super::*;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305};
use rustls::{
    crypto::aws_lc_rs::cipher_suite as suites,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite,
};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALL: Ciphers = Ciphers {
    aes_128_gcm: true,
    aes_256_gcm: true,
    chacha20_poly1305: true,
};

type Client = tokio_rustls::client::TlsStream<TcpStream>;
type Server = tokio_rustls::server::TlsStream<TlsIo>;

/// A handshake over loopback, the client offering `suite` only; the server reads whole records.
async fn session(suite: SupportedCipherSuite) -> (Server, Client) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["k.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    let mut server = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    server.enable_secret_extraction = true;
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let client = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (c, s) = crate::test_support::loopback_pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from("k.test").unwrap();
    let (server, client) = tokio::join!(
        acceptor.accept(TlsIo::whole_records(s)),
        connector.connect(name, c)
    );
    (server.unwrap(), client.unwrap())
}

/// A direction's AEAD algorithm, key, 12-byte IV, TLS version and next sequence number.
fn parts(info: &CryptoInfo) -> (&'static aws_lc_rs::aead::Algorithm, Vec<u8>, [u8; 12], u16, u64) {
    let alg = match info {
        CryptoInfo::Aes128Gcm(_) => &AES_128_GCM,
        CryptoInfo::Aes256Gcm(_) => &AES_256_GCM,
        CryptoInfo::Chacha20Poly1305(_) => &CHACHA20_POLY1305,
    };
    let (key, iv, version, seq) = info.parts();
    (alg, key.to_vec(), iv, version, seq)
}

/// The per-record nonce: TLS 1.3's and TLS 1.2 ChaCha20's (the IV xor the sequence number),
/// or TLS 1.2 AES-GCM's (the salt, then the record's explicit part).
fn nonce(iv: [u8; 12], seq: u64, explicit: Option<[u8; 8]>) -> Nonce {
    let mut n = iv;
    match explicit {
        Some(e) => n[4..].copy_from_slice(&e),
        None => n[4..]
            .iter_mut()
            .zip(seq.to_be_bytes())
            .for_each(|(b, s)| *b ^= s),
    }
    Nonce::assume_unique_for_key(n)
}

/// Opens an application-data record read off the wire, as the kernel would with `info`.
fn open(info: &CryptoInfo, record: &[u8]) -> Vec<u8> {
    let (alg, key, iv, version, seq) = parts(info);
    let key = LessSafeKey::new(UnboundKey::new(alg, &key).unwrap());
    let (header, body) = record.split_at(5);
    assert_eq!(header[0], APPLICATION_DATA);
    if version == libc::TLS_1_3_VERSION {
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(nonce(iv, seq, None), Aad::from(header), &mut body)
            .unwrap();
        let (content_type, data) = plain.split_last().unwrap();
        assert_eq!(*content_type, APPLICATION_DATA);
        return data.to_vec();
    }
    let gcm = !std::ptr::eq(alg, &CHACHA20_POLY1305);
    let (explicit, mut sealed) = if gcm {
        (Some(body[..8].try_into().unwrap()), body[8..].to_vec())
    } else {
        (None, body.to_vec())
    };
    let len = (sealed.len() - 16) as u16;
    let aad = [&seq.to_be_bytes()[..], &header[..3], &len.to_be_bytes()].concat();
    key.open_in_place(nonce(iv, seq, explicit), Aad::from(aad), &mut sealed)
        .unwrap()
        .to_vec()
}

/// Seals `data` into an application-data record with `info`, as the kernel would send it.
fn seal(info: &CryptoInfo, data: &[u8]) -> Vec<u8> {
    let (alg, key, iv, version, seq) = parts(info);
    let key = LessSafeKey::new(UnboundKey::new(alg, &key).unwrap());
    let wire_version = [3, 3];
    if version == libc::TLS_1_3_VERSION {
        let mut body = [data, &[APPLICATION_DATA]].concat();
        let len = (body.len() + 16) as u16;
        let header = [&[APPLICATION_DATA][..], &wire_version, &len.to_be_bytes()].concat();
        key.seal_in_place_append_tag(nonce(iv, seq, None), Aad::from(&header), &mut body)
            .unwrap();
        return [header, body].concat();
    }
    let gcm = !std::ptr::eq(alg, &CHACHA20_POLY1305);
    // TLS 1.2 AES-GCM: the explicit nonce the kernel writes, its first record's: the struct's IV.
    let explicit: [u8; 8] = iv[4..].try_into().unwrap();
    let aad = [
        &seq.to_be_bytes()[..],
        &[APPLICATION_DATA],
        &wire_version,
        &(data.len() as u16).to_be_bytes(),
    ]
    .concat();
    let mut body = data.to_vec();
    key.seal_in_place_append_tag(nonce(iv, seq, gcm.then_some(explicit)), Aad::from(aad), &mut body)
        .unwrap();
    let body = if gcm {
        [&explicit[..], &body].concat()
    } else {
        body
    };
    let header = [
        &[APPLICATION_DATA][..],
        &wire_version,
        &(body.len() as u16).to_be_bytes(),
    ]
    .concat();
    [header, body].concat()
}

/// Reads one whole record off a socket.
async fn read_record(tcp: &mut TcpStream) -> Vec<u8> {
    let mut header = [0u8; 5];
    tcp.read_exact(&mut header).await.unwrap();
    let mut body = vec![0u8; u16::from_be_bytes([header[3], header[4]]) as usize];
    tcp.read_exact(&mut body).await.unwrap();
    [&header[..], &body].concat()
}

async fn keys_work_both_ways(suite: SupportedCipherSuite) {
    let (server, mut client) = session(suite).await;
    let request = b"GET / HTTP/1.1\r\nHost: k.test\r\n\r\n";
    client.write_all(request).await.unwrap();
    client.flush().await.unwrap();
    let Ok(mut keys) = take_keys(server, &ALL) else {
        panic!("{suite:?}: the keys were not taken");
    };
    assert!(
        keys.early.is_empty(),
        "the request was left on the socket, not read by rustls"
    );
    let record = read_record(&mut keys.tcp).await;
    assert_eq!(open(&keys.rx, &record), request, "{suite:?}: receive keys");
    let response = b"HTTP/1.1 204 No Content\r\n\r\n";
    keys.tcp.write_all(&seal(&keys.tx, response)).await.unwrap();
    let mut got = vec![0u8; response.len()];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, response, "{suite:?}: send keys");
}

#[tokio::test]
async fn tls13_keys_work_both_ways() {
    for suite in [
        suites::TLS13_AES_128_GCM_SHA256,
        suites::TLS13_AES_256_GCM_SHA384,
        suites::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        keys_work_both_ways(suite).await;
    }
}

#[tokio::test]
async fn tls12_keys_work_both_ways() {
    for suite in [
        suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ] {
        keys_work_both_ways(suite).await;
    }
}

/// A cipher the kernel does not offer leaves the session with rustls, whole.
#[tokio::test]
async fn a_cipher_the_kernel_lacks_keeps_the_session_in_rustls() {
    let (server, mut client) = session(suites::TLS13_CHACHA20_POLY1305_SHA256).await;
    let aes_only = Ciphers {
        chacha20_poly1305: false,
        ..ALL
    };
    let Err(Taken::Kept(mut server, why)) = take_keys(server, &aes_only) else {
        panic!("the keys were taken");
    };
    assert_eq!(why, "a cipher this kernel does not offer");
    client.write_all(b"still rustls").await.unwrap();
    let mut got = [0u8; 12];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still rustls");
}

/// TLS 1.2 AES-GCM: the kernel's first nonce (and so every later one, counting up) is above
/// every nonce rustls used before the hand-off (`implicit XOR j` for `j < seq`), whatever the
/// implicit part; when none is left, the session stays with rustls.
#[test]
fn tls12_gcm_nonces_are_never_reused() {
    for implicit in [
        0u64,
        1,
        2,
        0x8000_0000_0000_0001,
        0x0123_4567_89ab_cdef,
        u64::MAX - 7,
    ] {
        for seq in [0u64, 1, 2, 3, 4, 5, 1000, 1 << 20] {
            let Some(first) = tls12_first_explicit_nonce(implicit, seq) else {
                assert!(implicit | seq.next_power_of_two().wrapping_sub(1) == u64::MAX);
                continue;
            };
            let used = (0..seq.min(5000)).map(|j| implicit ^ j);
            for u in used {
                assert!(
                    first > u,
                    "implicit {implicit:#x}, seq {seq}: first {first:#x} <= used {u:#x}"
                );
            }
        }
    }
    // What CryptoInfo gives the kernel is that nonce, for TLS 1.2 only.
    let iv = [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 1];
    let tls12 = CryptoInfo::new(ProtocolVersion::TLSv1_2, Cipher::Aes128Gcm, &[0; 16], &iv, 1).unwrap();
    assert_eq!(tls12.parts().1[4..], 2u64.to_be_bytes());
    let tls13 = CryptoInfo::new(ProtocolVersion::TLSv1_3, Cipher::Aes128Gcm, &[0; 16], &iv, 1).unwrap();
    assert_eq!(tls13.parts().1, iv);
}

/// The cipher of every suite rustls (aws-lc-rs) offers is one the kernel implements.
#[test]
fn every_offered_suite_has_a_kernel_cipher() {
    for suite in crate::tls::provider().cipher_suites.iter() {
        assert!(Cipher::of(suite.suite()).is_some(), "{suite:?}");
    }
}

/// Whatever the kernel, the answer agrees with the kernel's own list of loaded ULPs once lb
/// asked (asking loads the module when there is one).
#[test]
fn detection_agrees_with_the_kernels_list() {
    let found = detect();
    let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .map(|s| s.split_whitespace().any(|u| u == "tls"))
        .unwrap_or(false);
    assert_eq!(matches!(found, Ktls::Available(_)), listed, "{found:?}");
}
