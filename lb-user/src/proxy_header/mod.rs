//! The PROXY protocol header (HAProxy's proxy-protocol.txt, v1 text and v2 binary): what a
//! trusted load balancer in front of lb writes before its client's bytes, and what lb writes
//! before its own towards a server. The accept stage reads it (`listeners[].accept_proxy`), the
//! connect stage writes it (`backends[].send_proxy`).
//!
//! The `ppp` crate parses and builds the headers. This module frames them first, because
//! fuzzing ppp 2.3.0 found its v1 parser unsafe on partial input: a valid line cut after the
//! source port was a terminal error, complete lines stayed "incomplete", a bare LF ended a
//! header (counting payload as header) and `addresses_str` panicked. So the version comes from
//! the signature here, a v1 line is cut at its CRLF here and handed whole to ppp, and v2's
//! length, family byte and TLVs are checked here. "Incomplete" is not an error: [`parse`]
//! says how many bytes the header takes once it is all there.
use std::net::SocketAddr;

pub mod receive;
#[cfg(test)]
mod tests;

/// The longest v1 header, CRLF included (the specification's 107).
pub const V1_MAX: usize = 107;
/// The v2 signature.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v2 header lb takes: the 16 fixed bytes, the largest address block (AF_UNIX,
/// 216 bytes) and 4 KiB of TLVs (ALPN, authority, SSL and the like). The length field allows
/// 64 KiB, which a peer could use to make lb buffer that much before the first byte.
pub const V2_MAX: usize = 16 + 216 + 4096;
const V1_PREFIX: &[u8] = b"PROXY ";
/// v2 address family and transport bytes the specification defines (UNSPEC, TCP and UDP
/// over IPv4, IPv6 and UNIX); ppp also lets 0x01 and 0x10 through.
const V2_FAMILIES: [u8; 7] = [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32];
const TLV_ALPN: u8 = 0x01;
const TLV_AUTHORITY: u8 = 0x02;
const TLV_SSL: u8 = 0x20;

/// Which header to write (`send_proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A complete header at the start of a connection's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes it takes: the client's own bytes start after them.
    pub len: usize,
    pub version: Version,
    /// The client and the address it reached, as the sender saw them; `None` for a v2 LOCAL
    /// header (the sender's own health check), v1 `UNKNOWN` or a v2 family other than IP:
    /// the connection's own addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// v2 TLVs lb uses: the client's ALPN and TLS server name, and whether it came over TLS.
    pub alpn: Option<Vec<u8>>,
    pub authority: Option<String>,
    pub ssl: bool,
}

/// What lb knows of a client's connection beyond its address, for the header it sends on to
/// servers (`send_proxy`): from a received header, the TLS handshake lb terminated, or the
/// socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The address the client reached; `None` when no server of the listener's backends
    /// sends a header (nobody asked the socket).
    pub dst: Option<SocketAddr>,
    /// The ALPN protocol and the server name (SNI) of the client's TLS session: lb's own
    /// handshake's, or what a received v2 header carried.
    pub alpn: Option<Vec<u8>>,
    pub authority: Option<String>,
    /// A received v2 header's SSL TLV said the client came over TLS (to the load balancer in
    /// front): the forwarding fields then give the scheme as `https`.
    pub ssl: bool,
}

impl Origin {
    /// The header to write before a flow's first byte to a server, for `client`. With no
    /// destination known (a reload gave a kept-alive connection's listener a backend that
    /// sends headers), the unspecified address of the client's family stands for it.
    pub fn header(&self, version: Version, client: SocketAddr) -> std::io::Result<Vec<u8>> {
        let dst = self.dst.unwrap_or_else(|| {
            let any: std::net::IpAddr = match client.ip().to_canonical() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            };
            SocketAddr::new(any, 0)
        });
        encode(
            version,
            client,
            dst,
            self.alpn.as_deref(),
            self.authority.as_deref(),
        )
    }
}

/// The header of a health check's connection, which has no client: v1 `UNKNOWN`, v2 `LOCAL`
/// (what HAProxy sends with `check-send-proxy`).
pub fn check_header(version: Version) -> &'static [u8] {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n",
        Version::V2 => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
    }
}

/// What the bytes so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A header may still come: read more (within the listener's limits).
    Incomplete,
    Complete(Header),
}

/// Why the bytes are no acceptable header (the connection is closed, counted by reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol signature")]
    Missing,
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

impl HeaderError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::Missing => "missing",
            HeaderError::TooLong(_) => "too_long",
            HeaderError::Malformed(_) => "malformed",
        }
    }
}

/// Checks the bytes read so far for a header: incomplete, complete (with its length) or not
/// acceptable. Never reads past the header, never panics.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.starts_with(V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if buf.starts_with(V1_PREFIX) {
        return parse_v1(buf);
    }
    // Shorter than either prefix and a start of one of them.
    if V2_SIGNATURE.starts_with(buf) || V1_PREFIX.starts_with(buf) {
        return Ok(Parsed::Incomplete);
    }
    Err(HeaderError::Missing)
}

fn malformed(e: impl std::fmt::Display) -> HeaderError {
    HeaderError::Malformed(e.to_string())
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::TooLong(V1_MAX))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(malformed("v1 line not ended by CRLF"));
    }
    let line = &window[..=lf];
    // UNKNOWN: the receiver ignores the rest of the line, whatever it holds.
    if let Some(rest) = line.strip_prefix(b"PROXY UNKNOWN") {
        if rest.starts_with(b" ") || rest == b"\r\n" {
            return Ok(Parsed::Complete(Header {
                len: line.len(),
                version: Version::V1,
                addresses: None,
                alpn: None,
                authority: None,
                ssl: false,
            }));
        }
    }
    // Only CR before the LF; a sign before a port is not a port.
    if line[..lf - 1].iter().any(|&b| b == b'\r' || b == b'+') {
        return Err(malformed("v1 line with a stray CR or a signed number"));
    }
    let header = ppp::v1::Header::try_from(line).map_err(malformed)?;
    let addresses = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v1::Addresses::Tcp6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(Parsed::Complete(Header {
        len: line.len(),
        version: Version::V1,
        addresses,
        alpn: None,
        authority: None,
        ssl: false,
    }))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    // LOCAL (the sender's own connection, a health check): its block is skipped whatever it
    // holds, and the connection's own addresses stand.
    const LOCAL: u8 = 0x20;
    const PROXY: u8 = 0x21;
    if buf[12] != LOCAL && buf[12] != PROXY {
        return Err(malformed(format!("v2 version and command byte {:#04x}", buf[12])));
    }
    if !V2_FAMILIES.contains(&buf[13]) && buf[12] == PROXY {
        return Err(malformed(format!(
            "v2 address family and protocol byte {:#04x}",
            buf[13]
        )));
    }
    let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if total > V2_MAX {
        return Err(HeaderError::TooLong(V2_MAX));
    }
    if buf.len() < total {
        return Ok(Parsed::Incomplete);
    }
    if buf[12] == LOCAL {
        return Ok(Parsed::Complete(Header {
            len: total,
            version: Version::V2,
            addresses: None,
            alpn: None,
            authority: None,
            ssl: false,
        }));
    }
    let header = ppp::v2::Header::try_from(&buf[..total]).map_err(malformed)?;
    let (mut alpn, mut authority, mut ssl) = (None, None, false);
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(malformed)?;
        match tlv.kind {
            TLV_ALPN => alpn = Some(tlv.value.to_vec()),
            TLV_AUTHORITY => {
                let name =
                    std::str::from_utf8(&tlv.value).map_err(|_| malformed("v2 authority is not UTF-8"))?;
                authority = Some(name.to_owned());
            }
            // A client byte (its first bit: the client connected over SSL/TLS), 4 bytes of
            // verify result, then sub-TLVs, which must be well formed too.
            TLV_SSL => {
                let Some((&client, rest)) = tlv.value.split_first().filter(|(_, r)| r.len() >= 4) else {
                    return Err(malformed("v2 SSL TLV shorter than 5 bytes"));
                };
                for sub in ppp::v2::TypeLengthValues::from(&rest[4..]) {
                    sub.map_err(malformed)?;
                }
                ssl = client & 0x01 != 0;
            }
            _ => {}
        }
    }
    // Datagram families (0x12, 0x22) name no TCP connection: the connection's own addresses
    // stand, as for UNSPEC (HAProxy takes only TCP over IPv4 and IPv6).
    let stream = buf[13] & 0x0f == 0x01;
    let addresses = match (header.command, header.addresses) {
        (ppp::v2::Command::Local, _) => None,
        _ if !stream => None,
        (_, ppp::v2::Addresses::IPv4(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        (_, ppp::v2::Addresses::IPv6(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        (_, ppp::v2::Addresses::Unix(_) | ppp::v2::Addresses::Unspecified) => None,
    };
    Ok(Parsed::Complete(Header {
        len: total,
        version: Version::V2,
        addresses,
        alpn,
        authority,
        ssl,
    }))
}

/// The header lb writes before a flow's first byte towards a server: the client's address
/// and the one it reached; for v2 also the ALPN and server name lb saw when it terminated TLS
/// (each at most 255 bytes, else left out). Between an IPv4 and an IPv6 address both are
/// written as IPv6, the IPv4 one mapped, as HAProxy does.
pub fn encode(
    version: Version,
    client: SocketAddr,
    local: SocketAddr,
    alpn: Option<&[u8]>,
    authority: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    if version == Version::V1 {
        return Ok(ppp::v1::Addresses::from(same_family(client, local))
            .to_string()
            .into_bytes());
    }
    let pair = same_family(client, local);
    let mut builder = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        pair,
    );
    for (kind, value) in [(TLV_ALPN, alpn), (TLV_AUTHORITY, authority.map(str::as_bytes))] {
        if let Some(v) = value.filter(|v| !v.is_empty() && v.len() <= 255) {
            builder = builder.write_tlv(kind, v)?;
        }
    }
    builder.build()
}

/// Both addresses in one family, as HAProxy writes them: IPv4 when both are (an IPv4-mapped
/// IPv6 address from a dual-stack socket counts as IPv4), else both IPv6, IPv4 as mapped.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (client, local) = (canonical(client), canonical(local));
    if client.is_ipv4() == local.is_ipv4() {
        return (client, local);
    }
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        v6 => v6,
    };
    (mapped(client), mapped(local))
}
