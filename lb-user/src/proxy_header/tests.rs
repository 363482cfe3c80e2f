//! The PROXY header's framing, on the cases fuzzing ppp 2.3.0 found and the specification's.
use super::*;

fn complete(buf: &[u8]) -> Header {
    match parse(buf) {
        Ok(Parsed::Complete(h)) => h,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn v1_tcp4_and_tcp6_with_payload_after() {
    let h = complete(b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\nGET / HTTP/1.1\r\n");
    assert_eq!(h.len, 45);
    assert_eq!(h.version, Version::V1);
    assert_eq!(
        h.addresses,
        Some((addr("192.0.2.1:51000"), addr("198.51.100.2:443")))
    );
    let h = complete(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\nx");
    assert_eq!(
        h.addresses,
        Some((addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2")))
    );
    let h = complete(b"PROXY UNKNOWN\r\n");
    assert_eq!((h.len, h.addresses), (15, None));
}

#[test]
fn every_prefix_of_a_header_is_incomplete() {
    let v1: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n";
    let v2 = encode(
        Version::V2,
        addr("192.0.2.1:51000"),
        addr("198.51.100.2:443"),
        Some(b"h2"),
        Some("example.com"),
    )
    .unwrap();
    for header in [v1, &v2[..]] {
        for n in 0..header.len() {
            // ppp alone called `PROXY TCP4 1.1.1.1 2.2.2.2 80 ` malformed.
            assert_eq!(
                parse(&header[..n]),
                Ok(Parsed::Incomplete),
                "{n} bytes of {header:?}"
            );
        }
        assert_eq!(complete(header).len, header.len());
    }
}

#[test]
fn v1_lines_ppp_misread_are_refused_or_complete() {
    for bad in [
        // A bare LF: ppp took it, and the payload after it as header.
        &b"PROXY UNKNOWN \n hello world"[..],
        b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2 \n",
        // Complete lines ppp kept calling incomplete.
        b"PROXY TCP4 1.2.3.4\r\n",
        b"PROXY\rUNKNOWN\r\n",
        // A signed port.
        b"PROXY TCP4 1.1.1.1 2.2.2.2 +1 2\r\n",
        // What made ppp's addresses_str panic.
        b"PROXY UNKNOWN \n \xc3\xa9 ",
        b"PROXY TCP4 1.1.1.1 2.2.2.2 65536 2\r\n",
        b"PROXY TCP4 1.1.1.1  2.2.2.2 1 2\r\n",
        b"PROXY UDP4 1.1.1.1 2.2.2.2 1 2\r\n",
    ] {
        assert!(
            matches!(parse(bad), Err(HeaderError::Malformed(_) | HeaderError::Missing)),
            "{:?}: {:?}",
            String::from_utf8_lossy(bad),
            parse(bad)
        );
    }
}

#[test]
fn too_long_missing_and_wrong_signatures() {
    let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 200]].concat();
    assert_eq!(parse(&long), Err(HeaderError::TooLong(V1_MAX)));
    assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HeaderError::Missing));
    assert_eq!(parse(b"PROXX"), Err(HeaderError::Missing));
    assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(HeaderError::Missing));
    assert_eq!(HeaderError::Missing.reason(), "missing");
}

#[test]
fn v2_checks_its_family_length_version_and_tlvs() {
    let good = encode(Version::V2, addr("192.0.2.1:1"), addr("192.0.2.2:2"), None, None).unwrap();
    // A family byte the specification does not define.
    let mut bad = good.clone();
    bad[13] = 0x10;
    assert!(matches!(parse(&bad), Err(HeaderError::Malformed(_))));
    // Version 1 in the binary form, and a command other than LOCAL and PROXY.
    for byte in [0x11, 0x22] {
        let mut bad = good.clone();
        bad[12] = byte;
        assert!(matches!(parse(&bad), Err(HeaderError::Malformed(_))), "{byte:#x}");
    }
    // A length lb will not buffer.
    let mut bad = good.clone();
    bad[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(parse(&bad), Err(HeaderError::TooLong(V2_MAX)));
    // A TLV that runs past the header.
    let mut bad = good.clone();
    bad.extend_from_slice(&[TLV_ALPN, 0, 9, b'h']);
    let len = (bad.len() - 16) as u16;
    bad[14..16].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(parse(&bad), Err(HeaderError::Malformed(_))));
}

#[test]
fn v2_round_trips_with_its_tlvs_and_local_keeps_the_connection() {
    let bytes = encode(
        Version::V2,
        addr("[2001:db8::1]:40000"),
        addr("[2001:db8::2]:443"),
        Some(b"h2"),
        Some("example.com"),
    )
    .unwrap();
    let mut with_payload = bytes.clone();
    with_payload.extend_from_slice(b"payload");
    let h = complete(&with_payload);
    assert_eq!(h.len, bytes.len());
    assert_eq!(
        h.addresses,
        Some((addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:443")))
    );
    assert_eq!(
        (h.alpn.as_deref(), h.authority.as_deref()),
        (Some(&b"h2"[..]), Some("example.com"))
    );
    // LOCAL: the front load balancer's own check; its addresses are not a client's.
    let mut local = encode(Version::V2, addr("192.0.2.1:1"), addr("192.0.2.2:2"), None, None).unwrap();
    local[12] = 0x20;
    assert_eq!(complete(&local).addresses, None);
    // A mixed pair: IPv4-mapped in v2, UNKNOWN in v1.
    let mixed = encode(
        Version::V2,
        addr("192.0.2.1:1"),
        addr("[2001:db8::2]:2"),
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        complete(&mixed).addresses,
        Some((addr("[::ffff:192.0.2.1]:1"), addr("[2001:db8::2]:2")))
    );
    let v1 = encode(
        Version::V1,
        addr("192.0.2.1:1"),
        addr("[2001:db8::2]:2"),
        None,
        None,
    )
    .unwrap();
    assert_eq!(v1, b"PROXY UNKNOWN\r\n");
    let v1 = encode(Version::V1, addr("192.0.2.1:1"), addr("192.0.2.2:2"), None, None).unwrap();
    assert_eq!(v1, b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n");
}

#[test]
fn random_and_mutated_bytes_never_panic_nor_overrun() {
    let seeds = [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n".to_vec(),
        encode(
            Version::V2,
            addr("192.0.2.1:1"),
            addr("192.0.2.2:2"),
            Some(b"h2"),
            Some("a.example"),
        )
        .unwrap(),
    ];
    let mut rng = fastrand::Rng::with_seed(21);
    for i in 0..200_000 {
        let mut buf = seeds[i % 2].clone();
        for _ in 0..rng.usize(1..4) {
            let at = rng.usize(..buf.len());
            match rng.u8(..3) {
                0 => buf[at] = rng.u8(..),
                1 => buf.truncate(at),
                _ => buf.insert(at, rng.u8(..)),
            }
            if buf.is_empty() {
                break;
            }
        }
        if let Ok(Parsed::Complete(h)) = parse(&buf) {
            assert!(h.len <= buf.len(), "{buf:?}");
        }
    }
}
