//! The program's wake-up calls: it writes an [`Event`] to a ring buffer when it brakes a socket,
//! holds bytes the daemon must forward, or asks for a throttle; one reader task hands each to
//! the flow that owns the socket. Flows that are neither braked nor closing never wake the
//! daemon.
//!
//! A throttle request is also acted on here, at once: the reader shrinks the socket's receive
//! buffer itself. The flow's own task may run much later: session threads are bound to CPUs
//! that the kernel's forwarding work keeps busy, and a loopback sender fills the rest of the
//! bound in 2 to 6 ms (traced: the flow's task woke 5 to 18 ms after this reader had taken the
//! request, and most brakes came first; with the shrink done here, every brake in the traced
//! runs found the window shrunk). Who shrank, who gives back: see [`Wake`].
use aya::maps::{MapData, PerCpuArray, RingBuf};
use lb_common::{CpuStats, Event, EVENT_THROTTLE};
use std::{
    collections::HashMap,
    io,
    os::fd::{BorrowedFd, RawFd},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{io::unix::AsyncFd, sync::Notify};
use tokio_util::sync::CancellationToken;

use super::ctl::CtlArray;
use crate::sockopt;

/// The receive buffer of a throttled sender's socket (SO_RCVBUF's argument).
pub const THROTTLE_RCVBUF: u32 = 64 << 10;

/// One tracked socket's wake-up, and its throttle state: whether its receive buffer is shrunk
/// (by the reader or by the flow) and from what, and the socket the reader may shrink. Every
/// change of the buffer goes through the lock, so the flow's "give back, then mark the
/// request done" cannot interleave with the reader's "request still open? shrink".
pub struct Wake {
    notify: Notify,
    throttle: Mutex<Hook>,
}

struct Hook {
    /// The socket while its flow direction runs (-1 before and after): the reader touches it
    /// only under the lock, and the direction clears it before the socket can close.
    sock: RawFd,
    /// Shrunk: the buffer the socket had before (SO_RCVBUF's argument), to give back. Read at
    /// the shrink, so a flow that is never throttled pays no system call for it.
    shrunk: Option<u32>,
    /// Bytes are held while shrunk: the buffer was eased (see the flow direction).
    eased: bool,
}

impl Wake {
    fn new() -> Wake {
        Wake {
            notify: Notify::new(),
            throttle: Mutex::new(Hook {
                sock: -1,
                shrunk: None,
                eased: false,
            }),
        }
    }

    /// Waits for the next wake-up (a permit stored meanwhile counts).
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Lets the reader shrink `sock` (the socket of this slot) until the guard drops.
    pub fn attach(&self, sock: RawFd) -> Attached<'_> {
        self.hook().sock = sock;
        Attached(self)
    }

    /// Whether the receive buffer is shrunk now.
    pub fn shrunk(&self) -> bool {
        self.hook().shrunk.is_some()
    }

    /// The throttle state (a flow moving to another process): the buffer to give back if
    /// shrunk, and whether it was eased.
    pub fn throttle_state(&self) -> (Option<u32>, bool) {
        let hook = self.hook();
        (hook.shrunk, hook.eased)
    }

    /// Takes a moved flow's throttle state over.
    pub fn restore_throttle(&self, (shrunk, eased): (Option<u32>, bool)) {
        let mut hook = self.hook();
        hook.shrunk = shrunk;
        hook.eased = eased;
    }

    /// Shrinks the buffer of `fd` (this slot's socket) unless it is already.
    pub fn shrink(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut hook = self.hook();
        if hook.shrunk.is_none() {
            hook.shrunk = Some(shrink(fd)?);
        }
        Ok(())
    }

    /// While shrunk and not yet eased, sets the buffer to `bytes`, or to the buffer it had
    /// before if that is smaller (`tune.kernel_rcvbuf` may be); whether it did.
    pub fn ease(&self, fd: BorrowedFd<'_>, bytes: u32) -> io::Result<bool> {
        let mut hook = self.hook();
        let Some(before) = hook.shrunk.filter(|_| !hook.eased) else {
            return Ok(false);
        };
        sockopt::force_receive_buffer(fd, bytes.min(before))?;
        hook.eased = true;
        Ok(true)
    }

    /// Ends a throttle request: gives the buffer back if shrunk, then `done` (which publishes
    /// the request as dealt with), under the lock.
    pub fn end_throttle(&self, fd: BorrowedFd<'_>, done: impl FnOnce()) -> io::Result<()> {
        let mut hook = self.hook();
        if let Some(before) = hook.shrunk {
            sockopt::force_receive_buffer(fd, before)?;
            hook.shrunk = None;
            hook.eased = false;
        }
        done();
        Ok(())
    }

    /// The reader's part: shrinks the attached socket if `open` (the request is still open).
    fn throttle_now(&self, open: impl FnOnce() -> bool) {
        let mut hook = self.hook();
        if hook.sock < 0 || hook.shrunk.is_some() || !open() {
            return;
        }
        // SAFETY: the fd stays open while attached, and it is detached under this lock.
        let fd = unsafe { BorrowedFd::borrow_raw(hook.sock) };
        match shrink(fd) {
            Ok(before) => hook.shrunk = Some(before),
            // The flow's own task tries again (and ends the flow if the socket failed).
            Err(e) => tracing::debug!("throttle by the event reader failed: {e}"),
        }
    }

    fn hook(&self) -> std::sync::MutexGuard<'_, Hook> {
        self.throttle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Shrinks the receive buffer of `fd` to [`THROTTLE_RCVBUF`]; returns the one it had.
fn shrink(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // The kernel reports twice what it was given.
    let before = sockopt::receive_buffer(fd)? / 2;
    sockopt::force_receive_buffer(fd, THROTTLE_RCVBUF)?;
    Ok(before)
}

/// A socket the reader may shrink; detached when dropped.
pub struct Attached<'a>(&'a Wake);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.hook().sock = -1;
    }
}

/// Per tracked socket (by slot), what to wake.
#[derive(Default)]
pub struct Wakers {
    by_slot: Mutex<HashMap<u32, Arc<Wake>>>,
}

impl Wakers {
    pub fn register(&self, slot: u32) -> Arc<Wake> {
        let wake = Arc::new(Wake::new());
        self.lock().insert(slot, wake.clone());
        wake
    }

    pub fn unregister(&self, slot: u32) {
        self.lock().remove(&slot);
    }

    pub(super) fn wake(&self, slot: u32) {
        if let Some(w) = self.get(slot) {
            // A permit is stored if the flow is busy, so the wake-up is not lost.
            w.notify.notify_one();
        }
    }

    /// A throttle request from the program: shrinks the socket now, then wakes its flow.
    fn throttle(&self, slot: u32, ctl: &CtlArray) {
        if let Some(w) = self.get(slot) {
            w.throttle_now(|| ctl.throttle_open(slot));
            w.notify.notify_one();
        }
    }

    fn wake_all(&self) {
        for w in self.lock().values() {
            w.notify.notify_one();
        }
    }

    fn get(&self, slot: u32) -> Option<Arc<Wake>> {
        self.lock().get(&slot).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Wake>>> {
        self.by_slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How often the reader checks whether the ring buffer overflowed: then it wakes every flow,
/// so none stays braked for want of its event.
const LOST_CHECK: Duration = Duration::from_secs(1);

/// The running reader: stopped (an upgrade hands the ring buffer to a new process), it gives
/// the ring buffer back.
pub struct Reader {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Option<RingBuf<MapData>>>,
}

impl Reader {
    /// Stops the reader once it has handed out what it read; the ring buffer (`None` if the
    /// reader had failed).
    pub async fn stop(self) -> Option<RingBuf<MapData>> {
        self.stop.cancel();
        self.task.await.ok().flatten()
    }
}

/// Spawns the reader task.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    wakers: Arc<Wakers>,
    stats: Arc<PerCpuArray<MapData, CpuStats>>,
    ctl: Arc<CtlArray>,
) -> std::io::Result<Reader> {
    // SAFETY: the ring buffer owns its fd, which stays open until the AsyncFd drops it.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut lost_seen = super::sum_stats(&stats).events_lost;
        let mut check = tokio::time::interval(LOST_CHECK);
        loop {
            tokio::select! {
                biased;
                () = stopped.cancelled() => return Some(fd.into_inner()),
                ready = fd.readable_mut() => {
                    let Ok(mut guard) = ready else { return None };
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        if item.len() >= std::mem::size_of::<Event>() {
                            // SAFETY: the program writes whole `Event`s; read unaligned.
                            let event: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                            tracing::trace!("program event for slot {}: kind {}", event.slot, event.kind);
                            match event.kind {
                                EVENT_THROTTLE => wakers.throttle(event.slot, &ctl),
                                _ => wakers.wake(event.slot),
                            }
                        }
                    }
                    guard.clear_ready();
                }
                _ = check.tick() => {
                    let lost = super::sum_stats(&stats).events_lost;
                    if lost > lost_seen {
                        tracing::warn!("{} flow event(s) lost (ring buffer full): waking every kernel flow", lost - lost_seen);
                        lost_seen = lost;
                        wakers.wake_all();
                    }
                }
            }
        }
    });
    Ok(Reader { stop, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        net::{TcpListener, TcpStream},
        os::fd::{AsFd, AsRawFd},
    };

    fn socket() -> TcpStream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        TcpStream::connect(l.local_addr().unwrap()).unwrap()
    }

    /// A socket's own buffer in these tests: under the default `net.core.rmem_max`, so that
    /// they need no privilege.
    const FULL: u32 = 192 << 10;

    /// SO_RCVBUF as set (the kernel reports twice the argument).
    fn rcvbuf(s: &TcpStream) -> u32 {
        sockopt::receive_buffer(s.as_fd()).unwrap() / 2
    }

    #[test]
    fn the_reader_shrinks_only_an_attached_socket_with_an_open_request() {
        let s = socket();
        sockopt::force_receive_buffer(s.as_fd(), FULL).unwrap();
        let wake = Wake::new();
        // Not attached yet (no direction runs): nothing happens.
        wake.throttle_now(|| true);
        assert_eq!((rcvbuf(&s), wake.shrunk()), (FULL, false));
        let attached = wake.attach(s.as_raw_fd());
        // The request was closed meanwhile: nothing happens.
        wake.throttle_now(|| false);
        assert_eq!((rcvbuf(&s), wake.shrunk()), (FULL, false));
        wake.throttle_now(|| true);
        assert_eq!((rcvbuf(&s), wake.shrunk()), (THROTTLE_RCVBUF, true));
        // The direction's own shrink finds it done; the ease applies once per shrink.
        wake.shrink(s.as_fd()).unwrap();
        assert!(wake.ease(s.as_fd(), 128 << 10).unwrap());
        assert!(!wake.ease(s.as_fd(), 96 << 10).unwrap());
        assert_eq!(rcvbuf(&s), 128 << 10);
        let mut done = false;
        wake.end_throttle(s.as_fd(), || done = true).unwrap();
        assert_eq!((rcvbuf(&s), wake.shrunk(), done), (FULL, false, true));
        // Not shrunk: ending a request only publishes it.
        sockopt::force_receive_buffer(s.as_fd(), 160 << 10).unwrap();
        wake.end_throttle(s.as_fd(), || ()).unwrap();
        assert_eq!(rcvbuf(&s), 160 << 10);
        // Eased never above the buffer it had: shrunk from 160 KiB, eased to at most that.
        wake.shrink(s.as_fd()).unwrap();
        assert!(wake.ease(s.as_fd(), FULL).unwrap());
        assert_eq!(rcvbuf(&s), 160 << 10);
        wake.end_throttle(s.as_fd(), || ()).unwrap();
        // Detached (the direction ended): the reader leaves the socket alone.
        drop(attached);
        wake.throttle_now(|| true);
        assert_eq!((rcvbuf(&s), wake.shrunk()), (160 << 10, false));
    }
}
