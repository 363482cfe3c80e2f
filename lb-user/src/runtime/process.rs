//! The process itself, as `lb stats` and /stats.json show it (HAProxy's `show info`): its pid,
//! when it started, and how its last reload went.
use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

/// The running process.
pub struct ProcessRt {
    pub pid: u32,
    pub started: SystemTime,
    /// The same instant on the monotonic clock (the uptime does not jump with the wall clock).
    since: Instant,
    last_reload: Mutex<Option<Reload>>,
}

/// How a reload went.
#[derive(Debug, Clone)]
pub struct Reload {
    pub at: SystemTime,
    /// What asked for it (`SIGHUP`, `lb reload`).
    pub by: &'static str,
    /// `ok` or `refused`.
    pub result: &'static str,
    /// What it did, or why it was refused.
    pub detail: String,
}

impl ProcessRt {
    /// This process, starting now.
    pub fn new() -> ProcessRt {
        ProcessRt {
            pid: std::process::id(),
            started: SystemTime::now(),
            since: Instant::now(),
            last_reload: Mutex::new(None),
        }
    }

    pub fn uptime(&self) -> Duration {
        self.since.elapsed()
    }

    pub fn record_reload(&self, reload: Reload) {
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(reload);
    }

    pub fn last_reload(&self) -> Option<Reload> {
        self.last_reload.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Default for ProcessRt {
    fn default() -> ProcessRt {
        ProcessRt::new()
    }
}
