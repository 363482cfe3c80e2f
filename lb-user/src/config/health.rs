//! A backend's health settings, validated: `health_check:` (active checks) and `observe:`
//! (passive ejection). What runs them is [`crate::health`].
use super::{
    locate::Step,
    raw::{RawHealthCheck, RawObserve},
    with, Validator,
};
use std::time::Duration;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;

/// Active health checks of a backend's servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a DOWN server UP.
    pub rise: u32,
    /// Consecutive failures that take an UP server DOWN.
    pub fall: u32,
}

/// What one check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// The server accepts a TCP connection.
    Tcp,
    /// The server answers `GET path` with `expect_status` (any 2xx or 3xx when `None`).
    Http {
        path: String,
        expect_status: Option<u16>,
    },
}

impl Validator<'_> {
    pub(super) fn health_check(
        &mut self,
        path: &[Step],
        raw: Option<&RawHealthCheck>,
    ) -> Option<HealthCheck> {
        let raw = raw?;
        let at = |key| with(path, Step::Key(key));
        let interval = raw.interval.unwrap_or(DEFAULT_INTERVAL);
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
            self.error(
                &at("interval"),
                "health_check.interval must be between 100ms and 1h",
            );
        }
        let timeout = raw.timeout.unwrap_or(interval);
        if timeout.is_zero() || timeout > interval {
            self.error(
                &at("timeout"),
                "health_check.timeout must be above 0 and at most health_check.interval",
            );
        }
        let mut count = |key: &'static str, value: Option<u32>, default| {
            let n = value.unwrap_or(default);
            if !(1..=100).contains(&n) {
                self.error(&at(key), format!("health_check.{key} must be between 1 and 100"));
            }
            n.clamp(1, 100)
        };
        let rise = count("rise", raw.rise, DEFAULT_RISE);
        let fall = count("fall", raw.fall, DEFAULT_FALL);
        let kind = match raw.kind.as_deref() {
            None | Some("tcp") => {
                for (key, set) in [
                    ("path", raw.path.is_some()),
                    ("expect_status", raw.expect_status.is_some()),
                ] {
                    if set {
                        self.error(&at(key), format!("health_check.{key} needs kind: http"));
                    }
                }
                CheckKind::Tcp
            }
            Some("http") => {
                let check_path = raw.path.clone().unwrap_or_else(|| "/".into());
                // Sent as the request target: a path, in the bytes a request line may hold.
                if !check_path.starts_with('/') || !check_path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                    self.error(
                        &at("path"),
                        "health_check.path must start with / and hold no spaces or control characters",
                    );
                }
                if raw.expect_status.is_some_and(|s| !(100..=599).contains(&s)) {
                    self.error(
                        &at("expect_status"),
                        "health_check.expect_status must be between 100 and 599",
                    );
                }
                CheckKind::Http {
                    path: check_path,
                    expect_status: raw.expect_status,
                }
            }
            Some(other) => {
                self.error(
                    &at("kind"),
                    format!("health_check.kind: `{other}` is not supported; expected tcp or http"),
                );
                CheckKind::Tcp
            }
        };
        Some(HealthCheck {
            kind,
            interval,
            timeout,
            rise,
            fall,
        })
    }

    /// `observe.max_consecutive_errors`, which needs a health check to bring servers back.
    pub(super) fn observe(&mut self, path: &[Step], raw: Option<&RawObserve>, checked: bool) -> Option<u32> {
        let raw = raw?;
        let at = with(
            &with(path, Step::Key("observe")),
            Step::Key("max_consecutive_errors"),
        );
        if !(1..=1000).contains(&raw.max_consecutive_errors) {
            self.error(&at, "observe.max_consecutive_errors must be between 1 and 1000");
        }
        if !checked {
            self.error(
                &with(path, Step::Key("observe")),
                "observe needs a health_check: it brings an ejected server back",
            );
        }
        Some(raw.max_consecutive_errors)
    }
}
