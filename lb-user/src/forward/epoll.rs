//! A private epoll set for one kernel-forwarded flow, registered with tokio as one readable fd.
//!
//! Sockets are watched for EPOLLRDHUP only (errors and hang-ups are always reported), so bytes
//! the kernel redirects never wake the daemon; a socket whose bytes have to be copied in
//! userspace is switched to EPOLLIN as well.
use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};
use tokio::io::unix::AsyncFd;

use super::Side;

pub struct Epoll {
    fd: AsyncFd<OwnedFd>,
}

impl Epoll {
    /// Watches both sockets (`[client, server]`) for hang-ups and errors.
    pub fn new(socks: [&TcpStream; 2]) -> io::Result<Epoll> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        for (side, sock) in [Side::Client, Side::Server].into_iter().zip(socks) {
            ctl(raw, libc::EPOLL_CTL_ADD, sock, side, libc::EPOLLRDHUP as u32)?;
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Epoll { fd })
    }

    /// After a socket's end of stream (which would stay ready): report only errors and
    /// hang-ups, such as a reset that follows the half-close.
    pub fn errors_only(&self, sock: &TcpStream, side: Side) -> io::Result<()> {
        ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_MOD, sock, side, 0)
    }

    /// Also report readable data (a socket whose bytes are copied in userspace).
    pub fn with_input(&self, sock: &TcpStream, side: Side) -> io::Result<()> {
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_MOD, sock, side, events)
    }

    /// Stops watching a socket altogether.
    pub fn forget(&self, sock: &TcpStream) {
        // SAFETY: valid fds; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                sock.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }

    /// Waits until a socket reports something; returns which sockets did.
    pub async fn wait(&self) -> io::Result<Vec<Side>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // SAFETY: events has room for 2 entries; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), 2, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            return Ok(events[..n as usize]
                .iter()
                .map(|e| if e.u64 == 0 { Side::Client } else { Side::Server })
                .collect());
        }
    }
}

fn ctl(epoll: i32, op: i32, sock: &TcpStream, side: Side, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: side.index() as u64,
    };
    // SAFETY: both fds are valid; ev is a valid event.
    if unsafe { libc::epoll_ctl(epoll, op, sock.as_raw_fd(), &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
