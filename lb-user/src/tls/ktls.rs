//! kTLS: whether this kernel can take a TLS session's records over (the `tls` upper-layer
//! protocol, CONFIG_TLS), which is what would let a TLS flow be forwarded by the kernel.
//!
//! lb checks once at start by asking for the ULP on a loopback connection of its own (the
//! kernel loads the module on demand, so `/proc/sys/net/ipv4/tcp_available_ulp` alone could
//! say no where it would work). lb does not hand TLS sessions to the kernel yet: every flow
//! with a TLS side is forwarded in userspace, and lb says so at start, in `lb stats` and in
//! `lb_ktls_available`.
use std::{
    io,
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd,
};

/// What the kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ktls {
    Available,
    /// Why not (`ENOENT`: the kernel has no TLS ULP).
    Unavailable(String),
}

/// Asks the kernel for the TLS ULP on a loopback connection made for the purpose.
pub fn detect() -> Ktls {
    match try_ulp() {
        Ok(()) => Ktls::Available,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            Ktls::Unavailable("the kernel has no TLS upper-layer protocol (CONFIG_TLS)".into())
        }
        Err(e) => Ktls::Unavailable(format!("setting TCP_ULP \"tls\" failed: {e}")),
    }
}

fn try_ulp() -> io::Result<()> {
    // The ULP can only be set on an established socket.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let _accepted = listener.accept()?;
    let name = b"tls";
    // SAFETY: a valid fd and a buffer of the length given.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the kernel, the answer agrees with the kernel's own list of loaded ULPs once
    /// lb asked (asking loads the module when there is one).
    #[test]
    fn detection_agrees_with_the_kernels_list() {
        let found = detect();
        let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .map(|s| s.split_whitespace().any(|u| u == "tls"))
            .unwrap_or(false);
        assert_eq!(found == Ktls::Available, listed, "{found:?}");
    }
}
