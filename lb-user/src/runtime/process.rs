//! The process itself, as `lb stats` and /stats.json show it (HAProxy's `show info`): its pid,
//! when it started, and how its last reload and upgrade went.
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
    last_upgrade: Mutex<Option<UpgradeRecord>>,
}

/// How the last upgrade went: the one that started this process, or one this process tried
/// that failed (a successful one ends this process).
#[derive(Debug, Clone)]
pub struct UpgradeRecord {
    pub at: SystemTime,
    /// What asked for it (`SIGUSR2`, `lb upgrade`); for this process's own start, `upgrade`.
    pub by: &'static str,
    /// `ok` or `failed`.
    pub result: &'static str,
    pub detail: String,
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
            last_upgrade: Mutex::new(None),
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

    pub fn record_upgrade(&self, upgrade: UpgradeRecord) {
        *self.last_upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(upgrade);
    }

    pub fn last_upgrade(&self) -> Option<UpgradeRecord> {
        self.last_upgrade
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Default for ProcessRt {
    fn default() -> ProcessRt {
        ProcessRt::new()
    }
}
