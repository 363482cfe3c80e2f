//! A server's live state, shared by every thread: its weight (which `lb server weight` may
//! change), its administrative state (`lb server enable|disable|drain`), its health (health
//! checks and passive ejection), and its current sessions. The balancers read it at each pick;
//! nothing here waits.
use prometheus_client::metrics::gauge::Gauge;
use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering::Relaxed},
        Arc, Mutex,
    },
};
use tokio::sync::Notify;

/// What an operator set (HAProxy's `set server state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Admin {
    /// Takes new flows while healthy.
    Ready = 0,
    /// No new flows; the existing ones continue.
    Drain = 1,
    /// Maintenance: no new flows; existing flows continue. Its health checks go on (so its
    /// health is known when it comes back).
    Maint = 2,
}

/// The state a server is shown in (stats, logs): what an operator set first (MAINT, DRAIN),
/// then its health (DOWN, UP); the last check's result says why a drained server is failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
    Drain,
    Maint,
}

impl State {
    pub const ALL: [State; 4] = [State::Up, State::Down, State::Drain, State::Maint];

    pub fn name(self) -> &'static str {
        match self {
            State::Up => "UP",
            State::Down => "DOWN",
            State::Drain => "DRAIN",
            State::Maint => "MAINT",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug)]
pub struct ServerLive {
    weight: AtomicU32,
    admin: AtomicU8,
    /// Health: checks (or, without them, nothing) say it is up; passive ejection takes it down.
    up: AtomicBool,
    /// Live errors in a row (connect failures, 5xx), for passive ejection.
    errors: AtomicU32,
    /// Current sessions: the `lb_backend_active_sessions` gauge itself (an atomic).
    active: Gauge,
    /// Most sessions at once; 0: no limit. (A reload may change it.)
    maxconn: AtomicU32,
    /// Gone from the configuration (a reload removed it): it takes no new flows, and the flows
    /// it has go on.
    removed: AtomicBool,
    /// The backend's queue: told when a limited server frees a slot.
    queue: Arc<Notify>,
    /// `lb_server_up`: 1 while healthy.
    up_gauge: Gauge,
    /// The last health check's result, for stats (`-` before the first).
    last_check: Mutex<String>,
}

impl ServerLive {
    pub(super) fn new(
        weight: u32,
        maxconn: Option<u32>,
        gauges: (Gauge, Gauge),
        queue: Arc<Notify>,
    ) -> ServerLive {
        let (active, up_gauge) = gauges;
        up_gauge.set(1);
        ServerLive {
            maxconn: AtomicU32::new(maxconn.unwrap_or(0)),
            removed: AtomicBool::new(false),
            queue,
            weight: AtomicU32::new(weight),
            admin: AtomicU8::new(Admin::Ready as u8),
            up: AtomicBool::new(true),
            errors: AtomicU32::new(0),
            active,
            up_gauge,
            last_check: Mutex::new("-".into()),
        }
    }

    /// Its configured (or operator-set) weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Relaxed);
        self.wake_queue();
    }

    /// The weight a pick sees: 0 unless it takes new flows (ready and healthy, and still in
    /// the configuration).
    pub fn effective_weight(&self) -> u32 {
        if self.admin() == Admin::Ready && self.is_up() && !self.removed.load(Relaxed) {
            self.weight()
        } else {
            0
        }
    }

    /// Sessions that hold a [`super::Lease`] on it.
    pub fn active(&self) -> u32 {
        u32::try_from(self.active.get()).unwrap_or(0)
    }

    /// Its `maxconn` (`None`: no limit).
    pub fn maxconn(&self) -> Option<u32> {
        let maxconn = self.maxconn.load(Relaxed);
        (maxconn > 0).then_some(maxconn)
    }

    /// A reload changed its `maxconn`: sessions above a lower limit go on (new ones wait for
    /// them to end); a higher one lets queued sessions in at once.
    pub fn set_maxconn(&self, maxconn: Option<u32>) {
        self.maxconn.store(maxconn.unwrap_or(0), Relaxed);
        self.wake_queue();
    }

    /// At its `maxconn`.
    pub fn is_full(&self) -> bool {
        self.maxconn().is_some_and(|m| self.active() >= m)
    }

    /// A reload removed it from the configuration: no new flows from any generation's
    /// balancer (an HTTP connection kept alive across the reload picks with the one it started
    /// under); its flows go on.
    pub fn retire(&self) {
        self.removed.store(true, Relaxed);
        self.wake_queue();
    }

    /// A reload changed its address: what its health was says nothing of the new one, which
    /// starts as a new server does (up until its checks say otherwise).
    pub fn readdress(&self) {
        self.set_up(true);
        self.set_last_check("-".into());
    }

    /// Counts one more session unless that would pass `maxconn` (checked and counted at once:
    /// two threads cannot both take the last slot).
    pub(super) fn try_acquire(&self) -> bool {
        let limit = i64::from(self.maxconn.load(Relaxed));
        self.active
            .inner()
            .fetch_update(Relaxed, Relaxed, |n| (limit == 0 || n < limit).then_some(n + 1))
            .is_ok()
    }

    /// Counts a session that moved in under way (see [`super::Balancer::lease_moved_in`]).
    pub(super) fn count_moved_in(&self) {
        self.active.inc();
    }

    /// A session ended: the sessions queued for the backend look again.
    pub(super) fn release(&self) {
        self.active.dec();
        if self.maxconn.load(Relaxed) > 0 {
            self.wake_queue();
        }
    }

    /// Every session queued for the backend picks again. All of them, not one: a waiter may
    /// not be able to use what changed (a server its retries already tried), and one woken in
    /// vain would leave the others waiting beside a free slot. Each waiter registers before it
    /// picks, so none misses a change.
    fn wake_queue(&self) {
        self.queue.notify_waiters();
    }

    pub fn admin(&self) -> Admin {
        match self.admin.load(Relaxed) {
            0 => Admin::Ready,
            1 => Admin::Drain,
            _ => Admin::Maint,
        }
    }

    pub fn set_admin(&self, admin: Admin) {
        self.admin.store(admin as u8, Relaxed);
        self.wake_queue();
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Sets the health; whether it changed.
    pub fn set_up(&self, up: bool) -> bool {
        let was = self.up.swap(up, Relaxed);
        self.up_gauge.set(i64::from(up));
        if up {
            self.errors.store(0, Relaxed);
        }
        if was != up {
            // Up: a waiter may take it. Down: when it was the last server taking flows, the
            // waiters learn at once that none is left (503) instead of at `timeouts.queue`.
            self.wake_queue();
        }
        was != up
    }

    /// The state operators see (stats, the stats page, `lb_server_state`). A healthy server
    /// of weight 0 takes no new flows, as a drained one: it is shown DRAIN, as HAProxy shows
    /// it (its weight, 0, says why).
    pub fn state(&self) -> State {
        match (self.admin(), self.is_up()) {
            (Admin::Maint, _) => State::Maint,
            (Admin::Drain, _) => State::Drain,
            (Admin::Ready, false) => State::Down,
            (Admin::Ready, true) if self.weight() == 0 => State::Drain,
            (Admin::Ready, true) => State::Up,
        }
    }

    /// A live error (connect failure, 5xx) when ejection after `max` in a row is on: whether
    /// this one took the server down.
    pub fn live_error(&self, max: Option<u32>) -> bool {
        let Some(max) = max else {
            return false;
        };
        let n = self.errors.fetch_add(1, Relaxed) + 1;
        n >= max && self.is_up() && self.set_up(false)
    }

    /// A live success: the error run is over.
    pub fn live_success(&self) {
        if self.errors.load(Relaxed) != 0 {
            self.errors.store(0, Relaxed);
        }
    }

    pub fn last_check(&self) -> String {
        self.last_check.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set_last_check(&self, result: String) {
        if let Ok(mut s) = self.last_check.lock() {
            *s = result;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> ServerLive {
        ServerLive::new(2, None, Default::default(), Default::default())
    }

    #[test]
    fn maxconn_is_never_passed() {
        let s = ServerLive::new(1, Some(2), Default::default(), Default::default());
        assert!(s.try_acquire() && s.try_acquire());
        assert!(s.is_full());
        assert!(!s.try_acquire());
        assert_eq!(s.active(), 2);
        s.release();
        assert!(!s.is_full());
        assert!(s.try_acquire());
        // Unlimited.
        let s = live();
        assert!((0..1000).all(|_| s.try_acquire()));
        assert_eq!(s.maxconn(), None);
    }

    #[test]
    fn states_and_the_weight_a_pick_sees() {
        let s = live();
        assert_eq!((s.state(), s.effective_weight()), (State::Up, 2));
        s.set_admin(Admin::Drain);
        assert_eq!((s.state(), s.effective_weight()), (State::Drain, 0));
        s.set_up(false);
        assert_eq!(s.state(), State::Drain);
        s.set_admin(Admin::Maint);
        assert_eq!(s.state(), State::Maint);
        s.set_admin(Admin::Ready);
        assert_eq!((s.state(), s.effective_weight()), (State::Down, 0));
        s.set_up(true);
        assert_eq!((s.state(), s.effective_weight()), (State::Up, 2));
        // Weight 0: drained in effect, and shown so (HAProxy's DRAIN); down stays down.
        s.set_weight(0);
        assert_eq!((s.state(), s.effective_weight()), (State::Drain, 0));
        s.set_up(false);
        assert_eq!(s.state(), State::Down);
        s.set_up(true);
        s.set_weight(2);
        assert_eq!(s.state(), State::Up);
    }

    #[test]
    fn consecutive_live_errors_eject_once() {
        let s = live();
        assert!(!s.live_error(None));
        assert!(!s.live_error(Some(3)));
        s.live_success();
        assert!(!s.live_error(Some(3)));
        assert!(!s.live_error(Some(3)));
        assert!(s.live_error(Some(3)));
        assert!(!s.is_up());
        // Already down: not ejected again.
        assert!(!s.live_error(Some(3)));
        // Back up (a health check): the run starts over.
        s.set_up(true);
        assert!(!s.live_error(Some(3)));
    }
}
