//! The program's wake-up calls: it writes an [`Event`] to a ring buffer when it brakes a socket
//! or holds bytes the daemon must forward; one reader task hands each to the flow that owns the
//! socket. Flows that are neither braked nor closing never wake the daemon.
use aya::maps::{MapData, PerCpuArray, RingBuf};
use lb_common::{CpuStats, Event};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{io::unix::AsyncFd, sync::Notify};

/// Per tracked socket (by slot), what to wake.
#[derive(Default)]
pub struct Wakers {
    by_slot: Mutex<HashMap<u32, Arc<Notify>>>,
}

impl Wakers {
    pub fn register(&self, slot: u32) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.lock().insert(slot, notify.clone());
        notify
    }

    pub fn unregister(&self, slot: u32) {
        self.lock().remove(&slot);
    }

    pub(super) fn wake(&self, slot: u32) {
        if let Some(n) = self.lock().get(&slot) {
            // A permit is stored if the flow is busy, so the wake-up is not lost.
            n.notify_one();
        }
    }

    fn wake_all(&self) {
        for n in self.lock().values() {
            n.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Notify>>> {
        self.by_slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How often the reader checks whether the ring buffer overflowed: then it wakes every flow,
/// so none stays braked for want of its event.
const LOST_CHECK: Duration = Duration::from_secs(1);

/// Spawns the reader task.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    wakers: Arc<Wakers>,
    stats: Arc<PerCpuArray<MapData, CpuStats>>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd, which stays open until the AsyncFd drops it.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    tokio::spawn(async move {
        let mut lost_seen = 0;
        let mut check = tokio::time::interval(LOST_CHECK);
        loop {
            tokio::select! {
                ready = fd.readable_mut() => {
                    let Ok(mut guard) = ready else { return };
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        if item.len() >= std::mem::size_of::<Event>() {
                            // SAFETY: the program writes whole `Event`s; read unaligned.
                            let event: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                            wakers.wake(event.slot);
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
    Ok(())
}
