//! A private epoll set for one socket of a kernel-forwarded flow, registered with tokio as one
//! readable fd.
//!
//! The socket is watched for EPOLLRDHUP only (errors and hang-ups are always reported), so bytes
//! the kernel redirects never wake the daemon (tokio's own registration would, for every
//! received batch); while the daemon copies the socket's held bytes it also watches EPOLLIN.
use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};
use tokio::io::unix::AsyncFd;

pub struct Epoll {
    fd: AsyncFd<OwnedFd>,
}

impl Epoll {
    /// Watches `sock` for end of stream, hang-ups and errors.
    pub fn new(sock: &TcpStream) -> io::Result<Epoll> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        ctl(raw, libc::EPOLL_CTL_ADD, sock, libc::EPOLLRDHUP as u32)?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Epoll { fd })
    }

    /// Report end of stream, hang-ups and errors, not readable data.
    pub fn without_input(&self, sock: &TcpStream) -> io::Result<()> {
        ctl(
            self.fd.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            sock,
            libc::EPOLLRDHUP as u32,
        )
    }

    /// After the socket's end of stream (which would stay ready): report only errors and
    /// hang-ups, such as a reset that follows the half-close.
    pub fn errors_only(&self, sock: &TcpStream) -> io::Result<()> {
        ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_MOD, sock, 0)
    }

    /// Also report readable data (while the daemon copies the socket's held bytes).
    pub fn with_input(&self, sock: &TcpStream) -> io::Result<()> {
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_MOD, sock, events)
    }

    /// Stops watching the socket altogether.
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

    /// Waits until the socket reports something.
    pub async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut event = [libc::epoll_event { events: 0, u64: 0 }; 1];
            // SAFETY: event has room for 1 entry; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), event.as_mut_ptr(), 1, 0) };
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
            return Ok(());
        }
    }
}

fn ctl(epoll: i32, op: i32, sock: &TcpStream, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: 0 };
    // SAFETY: both fds are valid; ev is a valid event.
    if unsafe { libc::epoll_ctl(epoll, op, sock.as_raw_fd(), &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
