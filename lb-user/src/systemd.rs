//! Tells systemd how lb is doing (`Type=notify`, conf/lb.service), as sd_notify(3) describes:
//! READY=1 once every listener is bound and the admin endpoint listens; RELOADING=1 (with
//! MONOTONIC_USEC) and READY=1 again around each reload; STOPPING=1 when lb starts to stop;
//! MAINPID= when an upgrade's new process takes over.
//! Nothing without `$NOTIFY_SOCKET` (lb not started by systemd). The messages are sent by the
//! sd-notify crate.
use sd_notify::NotifyState;

/// lb serves.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// A reload starts; [`ready`] when it is over.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!("systemd: cannot read the monotonic clock for RELOADING=1: {e}"),
    }
}

/// An upgrade's new process (`pid`) serves now: systemd follows it (the unit's
/// `NotifyAccess=all` lets it say READY=1 itself) while this one finishes its flows.
pub fn main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
}

/// lb stops accepting and lets its flows finish.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("systemd: notifying {states:?} failed: {e}");
    }
}
