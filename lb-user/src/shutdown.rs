//! The signals the daemon acts on: SIGTERM or SIGINT starts a graceful stop ([`Signals`]);
//! SIGHUP and SIGUSR2 each ask for what they stand for ([`on_each`]).
use std::future::Future;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// SIGTERM and SIGINT handlers. Create them before anything reports readiness: until they exist
/// a signal has its default action and kills the process.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT, with its name.
    pub async fn received(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs `action` on each `kind` signal (`name`, e.g. `SIGHUP`) until `stop`, one at a time; if
/// the signal cannot be watched, says so with what is `lost` without it.
pub fn on_each<F, Fut>(
    kind: SignalKind,
    name: &'static str,
    lost: &'static str,
    stop: &CancellationToken,
    mut action: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let mut signals = match signal(kind) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch {name} ({lost}): {e}");
            return;
        }
    };
    let stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = signals.recv() => if got.is_none() { return },
            }
            action().await;
        }
    });
}
