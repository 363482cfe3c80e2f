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

fn v2(client: &str, local: &str, alpn: Option<&[u8]>, authority: Option<&str>) -> Vec<u8> {
    encode(Version::V2, addr(client), addr(local), alpn, authority).unwrap()
}

/// A v2 PROXY header for 192.0.2.1:1 → 192.0.2.2:2 with `tlvs` after the addresses.
fn v2_with(tlvs: &[u8]) -> Vec<u8> {
    let len = (12 + tlvs.len()) as u16;
    let addresses = [192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 2];
    [
        &V2_SIGNATURE[..],
        &[0x21, 0x11],
        &len.to_be_bytes(),
        &addresses,
        tlvs,
    ]
    .concat()
}

#[test]
fn v1_tcp4_tcp6_and_unknown_with_payload_after() {
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
    // The rest of an UNKNOWN line is ignored, whatever it holds (ppp refused this).
    let h = complete(b"PROXY UNKNOWN a b c d e +1 \xff\r\nx");
    assert_eq!((h.len, h.addresses), (30, None));
}

#[test]
fn v1_is_bounded_at_107_bytes() {
    let line = |n: usize| {
        let mut l = b"PROXY UNKNOWN ".to_vec();
        l.resize(n - 2, b'a');
        l.extend_from_slice(b"\r\n");
        l
    };
    assert_eq!(complete(&line(107)).len, 107);
    assert_eq!(parse(&line(108)), Err(HeaderError::TooLong(V1_MAX)));
    assert_eq!(parse(&line(108)[..106]), Ok(Parsed::Incomplete));
}

#[test]
fn every_prefix_of_a_header_is_incomplete() {
    let v1: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n";
    let v2 = v2(
        "192.0.2.1:51000",
        "198.51.100.2:443",
        Some(b"h2"),
        Some("example.com"),
    );
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
fn v1_lines_ppp_misread_are_refused() {
    for bad in [
        // A bare LF: ppp took it, and the payload after it as header.
        &b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2 \n"[..],
        b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\n",
        // A complete line ppp kept calling incomplete.
        b"PROXY TCP4 1.2.3.4\r\n",
        // A stray CR, a signed port, a port out of range, a double space, UDP.
        b"PROXY TCP4 1.1.1.1\r2.2.2.2 1 2\r\n",
        b"PROXY TCP4 1.1.1.1 2.2.2.2 +1 2\r\n",
        b"PROXY TCP4 1.1.1.1 2.2.2.2 65536 2\r\n",
        b"PROXY TCP4 1.1.1.1  2.2.2.2 1 2\r\n",
        b"PROXY UDP4 1.1.1.1 2.2.2.2 1 2\r\n",
        // UNKNOWN glued to something else.
        b"PROXY UNKNOWNX\r\n",
    ] {
        assert!(
            matches!(parse(bad), Err(HeaderError::Malformed(_))),
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
    assert_eq!(parse(b"PROXY\rUNKNOWN\r\n"), Err(HeaderError::Missing));
    assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(HeaderError::Missing));
    assert_eq!(HeaderError::Missing.reason(), "missing");
}

#[test]
fn v2_checks_its_family_length_version_and_tlvs() {
    let good = v2("192.0.2.1:1", "192.0.2.2:2", None, None);
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
    // A length shorter than the addresses.
    let mut bad = good.clone();
    bad[14..16].copy_from_slice(&8u16.to_be_bytes());
    assert!(matches!(parse(&bad), Err(HeaderError::Malformed(_))));
    // A TLV that runs past the header.
    assert!(matches!(
        parse(&v2_with(&[TLV_ALPN, 0, 9, b'h'])),
        Err(HeaderError::Malformed(_))
    ));
}

#[test]
fn v2_ssl_and_authority_tlvs_are_checked() {
    // SSL: client byte 0x01 (over TLS), verify 0, a version sub-TLV.
    let ssl = [&[TLV_SSL, 0, 11, 0x01, 0, 0, 0, 0][..], &[0x21, 0, 3], b"1.3"].concat();
    assert!(complete(&v2_with(&ssl)).ssl);
    assert!(!complete(&v2_with(&[TLV_SSL, 0, 5, 0x00, 0, 0, 0, 0])).ssl);
    for bad in [
        // Shorter than its client and verify fields.
        vec![TLV_SSL, 0, 2, 0x01, 0],
        // A sub-TLV running past the SSL TLV.
        [&[TLV_SSL, 0, 8, 0x01, 0, 0, 0, 0][..], &[0x21, 0, 9]].concat(),
        // An authority that is not UTF-8.
        vec![TLV_AUTHORITY, 0, 2, 0xc3, 0x28],
    ] {
        assert!(
            matches!(parse(&v2_with(&bad)), Err(HeaderError::Malformed(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn v2_round_trips_and_local_keeps_the_connection() {
    let bytes = v2(
        "[2001:db8::1]:40000",
        "[2001:db8::2]:443",
        Some(b"h2"),
        Some("example.com"),
    );
    let with_payload = [&bytes[..], b"payload"].concat();
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
    // LOCAL: the front load balancer's own check; its block is skipped, whatever it holds.
    let mut local = v2("192.0.2.1:1", "192.0.2.2:2", None, None);
    local[12] = 0x20;
    local[13] = 0x10;
    assert_eq!(complete(&local).addresses, None);
    let bare = [&V2_SIGNATURE[..], &[0x20, 0x00, 0, 0]].concat();
    assert_eq!(complete(&bare).len, 16);
    // AF_UNIX and UNSPEC under PROXY: the connection's own addresses stand.
    let unix = [&V2_SIGNATURE[..], &[0x21, 0x31, 0, 216], &[0u8; 216]].concat();
    assert_eq!(complete(&unix).addresses, None);
    let unspec = [&V2_SIGNATURE[..], &[0x21, 0x00, 0, 0]].concat();
    assert_eq!(complete(&unspec).addresses, None);
}

#[test]
fn mixed_families_are_written_as_ipv6_as_haproxy_does() {
    let mixed = v2("192.0.2.1:1", "[2001:db8::2]:2", None, None);
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
    assert_eq!(v1, b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2\r\n");
    // An IPv4-mapped address from a dual-stack socket is IPv4.
    let v1 = encode(
        Version::V1,
        addr("[::ffff:192.0.2.1]:1"),
        addr("192.0.2.2:2"),
        None,
        None,
    )
    .unwrap();
    assert_eq!(v1, b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n");
}

#[test]
fn random_and_mutated_bytes_keep_the_framing() {
    let seeds = [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n".to_vec(),
        v2("192.0.2.1:1", "192.0.2.2:2", Some(b"h2"), Some("a.example")),
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
        match parse(&buf) {
            // The header alone parses the same, and one byte less is not yet a header.
            Ok(Parsed::Complete(h)) => {
                assert_eq!(parse(&buf[..h.len]), Ok(Parsed::Complete(h.clone())), "{buf:?}");
                assert_eq!(parse(&buf[..h.len - 1]), Ok(Parsed::Incomplete), "{buf:?}");
            }
            // More bytes never mend a refusal.
            Err(e) => {
                let more = [&buf[..], b"\r\nmore"].concat();
                assert_eq!(parse(&more), Err(e), "{buf:?}");
            }
            Ok(Parsed::Incomplete) => {}
        }
    }
}

/// v2 datagram families (UDP over IPv4 and IPv6) name no TCP connection: accepted, and the
/// connection's own addresses stand.
#[test]
fn v2_udp_families_keep_the_connections_addresses() {
    for family in [0x12u8, 0x22] {
        let mut h = v2_with(&[]);
        h[13] = family;
        if family == 0x22 {
            h.truncate(14);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&[0u8; 36]);
        }
        assert_eq!(complete(&h).addresses, None, "{family:#04x}");
    }
    assert!(complete(&v2_with(&[])).addresses.is_some());
}
