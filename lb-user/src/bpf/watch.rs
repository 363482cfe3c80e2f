//! What the sockets of kernel flows report to the daemon: end of stream, hang-ups and errors
//! (and readable data while the daemon copies held bytes), through one epoll set for every
//! kernel flow.
//!
//! Each socket is in the set with EPOLLONESHOT and its control slot as the event's data; one
//! reader task hands each event to the slot's wake-up, the same one the program's ring-buffer
//! events use. Redirected bytes never wake the daemon: a socket is armed only while its flow
//! waits ([`Watch::wait`]), and only for what that wait is about. Compared with a private epoll
//! set per socket, a flow needs no descriptors beyond its two sockets (which is what lets
//! `bench idle` hold ~10,000 flows under a 20,000-descriptor limit), and no set to create,
//! register with tokio and close per socket.
use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU32, Ordering::Relaxed},
        Arc,
    },
};
use tokio::io::unix::AsyncFd;

use super::events::{Wake, Wakers};

/// Events a reader drains per system call.
const BATCH: usize = 64;

/// The epoll set of every kernel-flow socket, and the task that reads it.
pub struct Watcher {
    /// Shared with the reader task: the set stays open while either needs it.
    epoll: Arc<AsyncFd<OwnedFd>>,
}

impl Watcher {
    /// Creates the set and spawns its reader, which wakes the slot named by each event.
    pub fn spawn(wakers: Arc<Wakers>) -> io::Result<Watcher> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        let epoll = Arc::new(fd);
        tokio::spawn(read_events(epoll.clone(), wakers));
        Ok(Watcher { epoll })
    }
}

/// Hands every event to its slot's wake-up.
async fn read_events(fd: Arc<AsyncFd<OwnedFd>>, wakers: Arc<Wakers>) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
    loop {
        let Ok(mut guard) = fd.readable().await else {
            tracing::error!("the kernel flows' epoll set failed: flows no longer see ends and errors");
            return;
        };
        loop {
            // SAFETY: `events` has room for BATCH entries; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(fd.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            for event in &events[..n as usize] {
                // By value: the struct is packed on x86_64.
                let slot = event.u64;
                wakers.wake(slot as u32);
            }
            if (n as usize) < BATCH {
                break;
            }
        }
        guard.clear_ready();
    }
}

/// What a watched socket reports when armed (errors and hang-ups always).
#[derive(Clone, Copy)]
pub enum Interest {
    /// End of stream.
    EndOfStream = libc::EPOLLRDHUP as isize,
    /// End of stream and readable data (while the daemon copies the socket's held bytes).
    Input = (libc::EPOLLRDHUP | libc::EPOLLIN) as isize,
    /// After the socket's end of stream (which would stay ready): only a reset or a hang-up.
    ErrorsOnly = 0,
}

/// One socket in the set, reporting to its slot's wake-up.
pub struct Watch<'k> {
    watcher: &'k Watcher,
    sock: RawFd,
    slot: u32,
    wake: Arc<Wake>,
    interest: AtomicU32,
    /// The interest the socket is armed with, or [`NOT_ARMED`] once a wake-up may have been
    /// its (one-shot) event: a wait re-arms only then, or when the interest changed.
    armed: AtomicU32,
}

const NOT_ARMED: u32 = u32::MAX;

impl<'k> Watch<'k> {
    pub(super) fn add(
        watcher: &'k Watcher,
        sock: &TcpStream,
        slot: u32,
        wake: Arc<Wake>,
    ) -> io::Result<Watch<'k>> {
        let watch = Watch {
            watcher,
            sock: sock.as_raw_fd(),
            slot,
            wake,
            interest: AtomicU32::new(Interest::EndOfStream as u32),
            armed: AtomicU32::new(NOT_ARMED),
        };
        watch.ctl(libc::EPOLL_CTL_ADD)?;
        Ok(watch)
    }

    /// What the next [`wait`](Self::wait) is about.
    pub fn set_interest(&self, interest: Interest) {
        self.interest.store(interest as u32, Relaxed);
    }

    /// Waits until the socket reports what it was asked to (at once if that holds now) or the
    /// program signals its slot (a brake, or bytes held for the daemon). Either may have
    /// happened since the last wait, and a wake-up may be stale: callers check what changed.
    pub async fn wait(&self) -> io::Result<()> {
        // Arming re-checks the socket: a condition that holds now is reported at once. A
        // socket still armed for the same interest needs no call: its event is still pending.
        if self.armed.load(Relaxed) != self.interest.load(Relaxed) {
            self.ctl(libc::EPOLL_CTL_MOD)?;
        }
        self.wake.notified().await;
        self.armed.store(NOT_ARMED, Relaxed);
        Ok(())
    }

    /// Stops watching the socket (closing it would too).
    pub fn forget(&self) {
        self.armed.store(NOT_ARMED, Relaxed);
        // SAFETY: valid fds; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.watcher.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                self.sock,
                std::ptr::null_mut(),
            )
        };
    }

    fn ctl(&self, op: i32) -> io::Result<()> {
        let interest = self.interest.load(Relaxed);
        let events = interest | libc::EPOLLONESHOT as u32;
        let mut ev = libc::epoll_event {
            events,
            u64: u64::from(self.slot),
        };
        // SAFETY: both fds are valid (a flow's sockets outlive its waits); ev is a valid event.
        if unsafe { libc::epoll_ctl(self.watcher.epoll.as_raw_fd(), op, self.sock, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed.store(interest, Relaxed);
        Ok(())
    }
}
