//! kTLS: the kernel's TLS (the `tls` upper-layer protocol, CONFIG_TLS), which takes a session's
//! records over once rustls has done the handshake.
//!
//! lb checks once at start by asking for the ULP on a loopback connection of its own (the
//! kernel loads the module on demand, so `/proc/sys/net/ipv4/tcp_available_ulp` alone could
//! say no where it would work), and which ciphers the kernel takes (AES-GCM 128 and 256,
//! ChaCha20-Poly1305). Where it can, a client's session is handed to the kernel right after
//! its handshake ([`hand_off`]): rustls's traffic keys and record sequence numbers go to the
//! socket (`SOL_TLS`, `TLS_TX` and `TLS_RX`), and from then on lb reads and writes plaintext
//! on it ([`KtlsStream`]) while the kernel encrypts and decrypts. A session the kernel cannot
//! take (another cipher) stays with rustls.
//!
//! What the kernel does not do for lb: TLS 1.3 key updates (a peer's KeyUpdate ends the
//! session with an error, as the kernel cannot rekey a receive direction it was handed).
use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion};
use std::{
    io::{self, Read},
    mem::{size_of, MaybeUninit},
    net::{Ipv4Addr, TcpListener, TcpStream as StdTcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    pin::Pin,
    task::{ready, Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

use super::io::TlsIo;

/// What the kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ktls {
    Available(Ciphers),
    /// Why not (`ENOENT`: the kernel has no TLS ULP).
    Unavailable(String),
}

/// The ciphers the kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ciphers {
    pub aes_128_gcm: bool,
    pub aes_256_gcm: bool,
    pub chacha20_poly1305: bool,
}

impl Ciphers {
    fn has(&self, c: Cipher) -> bool {
        match c {
            Cipher::Aes128Gcm => self.aes_128_gcm,
            Cipher::Aes256Gcm => self.aes_256_gcm,
            Cipher::Chacha20Poly1305 => self.chacha20_poly1305,
        }
    }

    /// Their names, for the log and `lb stats`.
    pub fn names(&self) -> Vec<&'static str> {
        [Cipher::Aes128Gcm, Cipher::Aes256Gcm, Cipher::Chacha20Poly1305]
            .into_iter()
            .filter(|c| self.has(*c))
            .map(Cipher::name)
            .collect()
    }
}

/// A record cipher the kernel implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }

    /// The record cipher of a TLS 1.2 or 1.3 cipher suite.
    fn of(suite: CipherSuite) -> Option<Cipher> {
        use CipherSuite::*;
        match suite {
            TLS13_AES_128_GCM_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(Cipher::Aes128Gcm),
            TLS13_AES_256_GCM_SHA384
            | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(Cipher::Aes256Gcm),
            TLS13_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
            _ => None,
        }
    }
}

/// Asks the kernel for the TLS ULP, then for each cipher, on loopback connections made for
/// the purpose.
pub fn detect() -> Ktls {
    let probe = |cipher: Option<Cipher>| -> io::Result<()> {
        // The ULP can only be set on an established socket.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let client = StdTcpStream::connect(listener.local_addr()?)?;
        let _accepted = listener.accept()?;
        set_ulp(client.as_fd())?;
        if let Some(cipher) = cipher {
            // Zero keys: only whether the kernel takes the cipher is asked.
            let info = CryptoInfo::new(ProtocolVersion::TLSv1_3, cipher, &[0; 32], &[0; 12], 0)
                .expect("key and iv long enough for every cipher");
            info.set(client.as_fd(), libc::TLS_TX)?;
            info.set(client.as_fd(), libc::TLS_RX)?;
        }
        Ok(())
    };
    match probe(None) {
        Ok(()) => Ktls::Available(Ciphers {
            aes_128_gcm: probe(Some(Cipher::Aes128Gcm)).is_ok(),
            aes_256_gcm: probe(Some(Cipher::Aes256Gcm)).is_ok(),
            chacha20_poly1305: probe(Some(Cipher::Chacha20Poly1305)).is_ok(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            Ktls::Unavailable("the kernel has no TLS upper-layer protocol (CONFIG_TLS)".into())
        }
        Err(e) => Ktls::Unavailable(format!("setting TCP_ULP \"tls\" failed: {e}")),
    }
}

fn set_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    crate::sockopt::setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, b"tls".as_slice())
}

/// One direction's keys as the kernel takes them (`struct tls12_crypto_info_*`).
#[derive(Clone, Copy)]
pub(crate) enum CryptoInfo {
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

// The kernel checks the option's length against these (include/uapi/linux/tls.h).
const _: () = assert!(size_of::<libc::tls12_crypto_info_aes_gcm_128>() == 40);
const _: () = assert!(size_of::<libc::tls12_crypto_info_aes_gcm_256>() == 56);
const _: () = assert!(size_of::<libc::tls12_crypto_info_chacha20_poly1305>() == 56);

impl CryptoInfo {
    /// From a direction's key, its 12-byte IV (for AES-GCM, the kernel's 4-byte salt and
    /// 8-byte IV; ChaCha20 takes the 12 bytes as its IV) and the sequence number of the next
    /// record. `None` when a length is wrong for the cipher.
    fn new(version: ProtocolVersion, cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> Option<CryptoInfo> {
        let tls12 = version == ProtocolVersion::TLSv1_2;
        let version = if tls12 {
            libc::TLS_1_2_VERSION
        } else {
            libc::TLS_1_3_VERSION
        };
        let iv: &[u8; 12] = iv.get(..12)?.try_into().ok()?;
        let rec_seq = seq.to_be_bytes();
        let salt = iv[..4].try_into().ok()?;
        let implicit = u64::from_be_bytes(iv[4..].try_into().ok()?);
        let explicit = if tls12 {
            tls12_first_explicit_nonce(implicit, seq)?
        } else {
            implicit
        }
        .to_be_bytes();
        Some(match cipher {
            Cipher::Aes128Gcm => CryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                },
                iv: explicit,
                key: key.get(..16)?.try_into().ok()?,
                salt,
                rec_seq,
            }),
            Cipher::Aes256Gcm => CryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                },
                iv: explicit,
                key: key.get(..32)?.try_into().ok()?,
                salt,
                rec_seq,
            }),
            Cipher::Chacha20Poly1305 => {
                CryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                    info: libc::tls_crypto_info {
                        version,
                        cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
                    },
                    iv: *iv,
                    key: key.get(..32)?.try_into().ok()?,
                    salt: [],
                    rec_seq,
                })
            }
        })
    }

    /// Its parts, for the tests: the key, the 12-byte IV (salt and IV), the TLS version and
    /// the next record's sequence number.
    #[cfg(test)]
    fn parts(&self) -> (&[u8], [u8; 12], u16, u64) {
        let joined = |salt: &[u8], iv: &[u8]| -> [u8; 12] {
            let mut all = [0u8; 12];
            all[..salt.len()].copy_from_slice(salt);
            all[salt.len()..].copy_from_slice(iv);
            all
        };
        match self {
            CryptoInfo::Aes128Gcm(i) => (
                &i.key,
                joined(&i.salt, &i.iv),
                i.info.version,
                u64::from_be_bytes(i.rec_seq),
            ),
            CryptoInfo::Aes256Gcm(i) => (
                &i.key,
                joined(&i.salt, &i.iv),
                i.info.version,
                u64::from_be_bytes(i.rec_seq),
            ),
            CryptoInfo::Chacha20Poly1305(i) => (&i.key, i.iv, i.info.version, u64::from_be_bytes(i.rec_seq)),
        }
    }

    /// From what rustls extracted for one direction: (sequence number, secrets).
    fn from_rustls(
        version: ProtocolVersion,
        cipher: Cipher,
        (seq, secrets): (u64, ConnectionTrafficSecrets),
    ) -> Option<CryptoInfo> {
        let (key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => return None,
        };
        // rustls names TLS 1.2's AES-256-GCM keys Aes128Gcm too: the key's length tells.
        let cipher = match (cipher, key.len()) {
            (Cipher::Aes128Gcm | Cipher::Aes256Gcm, 16) => Cipher::Aes128Gcm,
            (Cipher::Aes128Gcm | Cipher::Aes256Gcm, 32) => Cipher::Aes256Gcm,
            (Cipher::Chacha20Poly1305, 32) => Cipher::Chacha20Poly1305,
            _ => return None,
        };
        CryptoInfo::new(version, cipher, key, iv, seq)
    }

    /// Installs the keys on a socket with the TLS ULP, for `TLS_TX` or `TLS_RX`.
    fn set(&self, fd: BorrowedFd<'_>, direction: libc::c_int) -> io::Result<()> {
        use crate::sockopt::setsockopt;
        match self {
            CryptoInfo::Aes128Gcm(i) => setsockopt(fd, libc::SOL_TLS, direction, i),
            CryptoInfo::Aes256Gcm(i) => setsockopt(fd, libc::SOL_TLS, direction, i),
            CryptoInfo::Chacha20Poly1305(i) => setsockopt(fd, libc::SOL_TLS, direction, i),
        }
    }
}

/// The explicit nonce of the kernel's first TLS 1.2 AES-GCM record after the hand-off.
///
/// rustls's nonces are the salt and `implicit XOR seq`; the kernel's are the salt and a counter
/// it starts at the `iv` it is given and adds 1 to per record. Given `implicit` itself, its
/// first record would reuse the nonce rustls's record 0 (the Finished) had under the same key,
/// which GCM must never do. Every nonce rustls used (`implicit XOR j`, `j < seq`) differs from
/// `implicit` only in the bits below `seq`'s next power of two: the kernel starts above all of
/// them. `None` when that would wrap around, which needs every bit of the random implicit part
/// above `seq` set (the hand-off then fails and the session is closed). (For ChaCha20 and TLS
/// 1.3 the kernel derives nonces from the sequence number, as rustls does.)
fn tls12_first_explicit_nonce(implicit: u64, seq: u64) -> Option<u64> {
    let below = seq.checked_next_power_of_two()?.wrapping_sub(1);
    (implicit | below).checked_add(1)
}

/// A client's TLS session after its handshake.
pub enum HandOff {
    /// The kernel has it.
    Kernel(KtlsStream),
    /// It stays with rustls: why.
    Kept(Box<tokio_rustls::server::TlsStream<TlsIo>>, &'static str),
    /// The keys were out of rustls when the kernel refused them: the session is lost.
    Failed(io::Error),
}

/// Hands a client's session to the kernel, when the kernel takes its cipher and rustls holds
/// no part of a record. Plaintext rustls had decrypted already is read first, by lb, from the
/// [`KtlsStream`].
pub fn hand_off(tls: tokio_rustls::server::TlsStream<TlsIo>, ciphers: &Ciphers) -> HandOff {
    let keys = match take_keys(tls, ciphers) {
        Ok(keys) => keys,
        Err(Taken::Kept(tls, why)) => return HandOff::Kept(tls, why),
        Err(Taken::Failed(e)) => return HandOff::Failed(e),
    };
    let fd = keys.tcp.as_fd();
    let installed = set_ulp(fd)
        .and_then(|()| keys.tx.set(fd, libc::TLS_TX))
        .and_then(|()| keys.rx.set(fd, libc::TLS_RX));
    match installed {
        Ok(()) => HandOff::Kernel(KtlsStream {
            tcp: keys.tcp,
            early: keys.early,
            early_read: 0,
            read: ReadSide::Open,
            close_notify_sent: false,
        }),
        Err(e) => HandOff::Failed(e),
    }
}

/// A session's keys, out of rustls, with its socket and the plaintext rustls had decrypted.
struct Keys {
    tcp: TcpStream,
    tx: CryptoInfo,
    rx: CryptoInfo,
    early: Vec<u8>,
}

/// Why [`take_keys`] did not.
enum Taken {
    Kept(Box<tokio_rustls::server::TlsStream<TlsIo>>, &'static str),
    Failed(io::Error),
}

/// Takes the keys out of rustls, unless the kernel could not go on from where rustls is (the
/// session is then given back, with plain reads).
fn take_keys(mut tls: tokio_rustls::server::TlsStream<TlsIo>, ciphers: &Ciphers) -> Result<Keys, Taken> {
    let (io, conn) = tls.get_mut();
    let at_boundary = io.at_record_boundary();
    let cipher = conn.negotiated_cipher_suite().and_then(|s| Cipher::of(s.suite()));
    let version = conn.protocol_version();
    let why = match (cipher, version) {
        _ if !at_boundary => Some("part of a record read"),
        _ if conn.wants_write() => Some("records to send"),
        (None, _) | (_, None) => Some("a cipher the kernel does not implement"),
        (Some(c), _) if !ciphers.has(c) => Some("a cipher this kernel does not offer"),
        _ => None,
    };
    let (Some(cipher), Some(version), None) = (cipher, version, why) else {
        tls.get_mut().0.plain_reads();
        return Err(Taken::Kept(Box::new(tls), why.unwrap_or("unknown")));
    };
    // The records rustls read whole: decrypted, then taken out as plaintext (lb reads it first).
    // A client that already closed, or sent something rustls refuses, is left to rustls, which
    // reports it as on any session.
    let kept = match conn.process_new_packets() {
        Err(_) => Some("rustls refused a record"),
        Ok(state) if state.peer_has_closed() => Some("the client closed"),
        Ok(_) => None,
    };
    if let Some(why) = kept {
        tls.get_mut().0.plain_reads();
        return Err(Taken::Kept(Box::new(tls), why));
    }
    let mut early = Vec::new();
    match conn.reader().read_to_end(&mut early) {
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(Taken::Failed(e)),
        _ => {}
    }
    let (io, conn) = tls.into_inner();
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| Taken::Failed(io::Error::other(e)))?;
    let refused = || Taken::Failed(io::Error::other("rustls's keys do not fit the kernel's cipher"));
    Ok(Keys {
        tcp: io.into_tcp(),
        tx: CryptoInfo::from_rustls(version, cipher, secrets.tx).ok_or_else(refused)?,
        rx: CryptoInfo::from_rustls(version, cipher, secrets.rx).ok_or_else(refused)?,
        early,
    })
}

/// What the peer's last record said about its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadSide {
    Open,
    /// The peer's close_notify: its clean end of stream.
    Closed,
}

/// A socket whose TLS records the kernel encrypts and decrypts: lb reads and writes plaintext.
/// The peer's alerts come as control messages: a close_notify is the end of stream; a TCP
/// close without one reads as `UnexpectedEof`, as from rustls, and so does any other alert or
/// record type as an error.
pub struct KtlsStream {
    tcp: TcpStream,
    /// Plaintext rustls decrypted before the hand-off; read first.
    early: Vec<u8>,
    early_read: usize,
    read: ReadSide,
    close_notify_sent: bool,
}

/// A TLS record's content type.
const ALERT: u8 = 21;
const APPLICATION_DATA: u8 = 23;
/// An alert's description: close_notify.
const CLOSE_NOTIFY: u8 = 0;

impl KtlsStream {
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether plaintext decrypted before the hand-off is still unread.
    pub fn holds_input(&self) -> bool {
        self.early_read < self.early.len()
    }
}

/// Room for one control message of one byte (a record type), aligned as the kernel reads and
/// writes it.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// A msghdr for one buffer (`iov`) and the first `control_len` bytes of `control`; both must
/// outlive its use.
fn msghdr(iov: &mut libc::iovec, control: &mut Control, control_len: usize) -> libc::msghdr {
    // SAFETY: a zeroed msghdr is valid (no address, no buffers).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control_len.min(control.0.len()) as _;
    msg
}

/// One `recvmsg` on a kTLS socket: the bytes read and the record type, if the kernel said.
fn recv_record(fd: RawFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<(usize, Option<u8>)> {
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg = msghdr(&mut iov, &mut control, 64);
    // SAFETY: a valid fd and a msghdr whose buffers are valid for their lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = None;
    // SAFETY: the control buffer was filled by the kernel as `msg` describes.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE {
                record_type = Some(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, record_type))
}

/// Sends a close_notify alert through the kernel's TLS.
fn send_close_notify(fd: RawFd) -> io::Result<()> {
    let mut alert = [1u8 /* warning */, CLOSE_NOTIFY];
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: alert.as_mut_ptr().cast(),
        iov_len: alert.len(),
    };
    // SAFETY: CMSG_SPACE only computes a length.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let msg = msghdr(&mut iov, &mut control, space);
    // SAFETY: the control buffer has room for one one-byte message (CMSG_SPACE(1) <= 64).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = ALERT;
    }
    // SAFETY: a valid fd and a msghdr whose buffers are valid for their lengths.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl AsyncRead for KtlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.holds_input() {
            let early = &this.early[this.early_read..];
            let n = early.len().min(buf.remaining());
            buf.put_slice(&early[..n]);
            this.early_read += n;
            if !this.holds_input() {
                this.early = Vec::new();
                this.early_read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if this.read == ReadSide::Closed || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let fd = this.tcp.as_raw_fd();
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            // SAFETY: recvmsg only writes to the unfilled part, and what it wrote is marked
            // filled below.
            let unfilled = unsafe { buf.unfilled_mut() };
            match this.tcp.try_io(Interest::READABLE, || recv_record(fd, unfilled)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok((0, None)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed connection without sending TLS close_notify",
                    )))
                }
                // An empty record: no data, and not the end of the stream.
                Ok((0, Some(APPLICATION_DATA))) => continue,
                Ok((n, None | Some(APPLICATION_DATA))) => {
                    // SAFETY: the kernel wrote `n` bytes at the start of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok((n, Some(ALERT))) => {
                    // The alert's two bytes (level, description) are in the buffer, not data.
                    let description = if n >= 2 {
                        // SAFETY: the kernel wrote `n` >= 2 bytes there.
                        Some(unsafe { buf.unfilled_mut()[1].assume_init() })
                    } else {
                        None
                    };
                    if description == Some(CLOSE_NOTIFY) {
                        this.read = ReadSide::Closed;
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("TLS alert {description:?} from the peer"),
                    )));
                }
                Ok((_, Some(other))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a TLS record of type {other} after the hand-off to the kernel (a key update?)"
                        ),
                    )))
                }
            }
        }
    }
}

impl AsyncWrite for KtlsStream {
    // The kernel makes the records.
    writes_to_tcp!();

    /// A close_notify, then the TCP write side is shut.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.close_notify_sent {
            ready!(this.tcp.poll_write_ready(cx))?;
            let fd = this.tcp.as_raw_fd();
            match this.tcp.try_io(Interest::WRITABLE, || send_close_notify(fd)) {
                Ok(()) => this.close_notify_sent = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
