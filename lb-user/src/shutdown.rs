//! The one signal future the daemon waits on: SIGTERM or SIGINT starts a graceful stop.
use tokio::signal::unix::{signal, Signal, SignalKind};

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
