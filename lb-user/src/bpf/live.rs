//! The kernel bytes of flows while they run: the program counts each socket's redirected bytes
//! in its control slot ([`lb_common::SockCtl::redirected`]), which the daemon reads without a
//! syscall. Each live flow is registered with the counter its bytes go to (its server's
//! `lb_server_forwarded_bytes_total{path="kernel"}`, which `lb stats` shows too) and how much of
//! them that counter has had; [`Kernel::catch_up_live`] adds what is new before each scrape and
//! stats snapshot, and the flow's last bytes are added when it leaves ([`LiveCount`]'s drop).
//! A counter so never goes back, and no byte is counted twice.
//!
//! Nothing else reads the slots here, so nothing wakes for it: a flow the kernel forwards costs
//! the daemon nothing until someone looks.
use prometheus_client::metrics::counter::Counter;
use std::{collections::HashMap, sync::Mutex};

use super::{lock, Kernel};

/// Every live kernel flow of this process, by its client socket's cookie.
#[derive(Default)]
pub(super) struct LiveFlows(Mutex<HashMap<u64, Entry>>);

struct Entry {
    /// The flow's two control slots (client, server).
    slots: [u32; 2],
    counter: Counter,
    /// Of the bytes the slots count, those `counter` has had.
    reported: u64,
}

impl Entry {
    /// Adds the bytes redirected since the last time to the counter.
    fn catch_up(&mut self, kernel: &Kernel) {
        let now: u64 = self.slots.iter().map(|&s| kernel.ctl.redirected(s)).sum();
        if now > self.reported {
            self.counter.inc_by(now - self.reported);
            self.reported = now;
        }
    }
}

/// A flow's registration: while it lives, its slots must stay the flow's (drop it before the
/// flow's [`super::Tracked`] sockets). Dropping it adds the flow's last bytes.
pub struct LiveCount<'k> {
    kernel: &'k Kernel,
    key: u64,
}

impl Kernel {
    /// Counts the kernel bytes of the flow whose client socket has `cookie` and whose sockets
    /// have `slots` (client, server) into `counter` as they go; `reported` of the bytes the
    /// slots count already were (a flow that resumes after a move).
    pub fn count_live(&self, cookie: u64, slots: [u32; 2], counter: Counter, reported: u64) -> LiveCount<'_> {
        let entry = Entry {
            slots,
            counter,
            reported,
        };
        lock(&self.live.0).insert(cookie, entry);
        LiveCount {
            kernel: self,
            key: cookie,
        }
    }

    /// Adds each live flow's new kernel bytes to its counter (before a scrape or a snapshot).
    pub fn catch_up_live(&self) {
        for entry in lock(&self.live.0).values_mut() {
            entry.catch_up(self);
        }
    }
}

impl Drop for LiveCount<'_> {
    fn drop(&mut self) {
        // Under the lock: a catch-up either saw the entry or sees it gone, never half of it.
        let mut flows = lock(&self.kernel.live.0);
        if let Some(mut entry) = flows.remove(&self.key) {
            entry.catch_up(self.kernel);
        }
    }
}
