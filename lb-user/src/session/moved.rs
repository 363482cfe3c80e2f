//! Kernel flows that move between processes (an upgrade, [`crate::upgrade`]): a session whose
//! kernel flow stopped for a move hands it to the wiring with what the session knew
//! ([`MovedFlow`]); the new process (or this one, when the upgrade failed) resumes each in a
//! session of its own ([`resume`]), which ends as any kernel flow does (counters, logs, the
//! access-log record of an HTTP hand-off).
use serde::{Deserialize, Serialize};
use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{finish, log_handoff_end, FlowInfo, Outcome, Session};
use crate::{
    balance::Lease,
    forward::{
        self,
        kernel::{Forwarded, Moving},
        Totals,
    },
    http::{
        handoff::{Handed, Kind},
        log::Format,
    },
    runtime::{BackendRt, ListenerRt},
};

/// A kernel flow out of its session, and what the session knew of it.
pub struct MovedFlow {
    pub moving: Moving,
    pub info: MovedInfo,
}

/// Who a moved flow connects (by name: the new process finds its own objects), for its counters
/// and logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedInfo {
    pub listener: String,
    pub backend: String,
    pub server: String,
    pub peer: SocketAddr,
    pub http: Option<MovedHttp>,
}

/// An HTTP hand-off's exchange, for the access-log record written when the flow ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedHttp {
    pub kind: Kind,
    pub method: String,
    pub host: String,
    pub target: String,
    pub status: u16,
    pub format: Format,
    /// Since lb began to wait for the request.
    pub elapsed: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub times: [i64; 3],
}

impl MovedInfo {
    pub(super) fn of(listener: &ListenerRt, info: &FlowInfo) -> MovedInfo {
        let backend = &info.backend.config;
        MovedInfo {
            listener: listener.config.name.clone(),
            backend: backend.name.clone(),
            server: backend.servers[info.lease.index()].name.clone(),
            peer: info.peer,
            http: info.http.as_ref().map(|(kind, h)| MovedHttp {
                kind: *kind,
                method: h.method.clone(),
                host: h.host.clone(),
                target: h.target.clone(),
                status: h.status,
                format: h.format,
                elapsed: h.since.elapsed(),
                bytes_in: h.bytes_in,
                bytes_out: h.bytes_out,
                times: h.times,
            }),
        }
    }
}

/// Hands a flow stopped for a move to the wiring.
pub(super) fn hand_over(listener: &ListenerRt, info: &FlowInfo, moving: Moving) -> Session {
    let flow = MovedFlow {
        moving,
        info: MovedInfo::of(listener, info),
    };
    if let Err(lost) = listener.shared.moved.send(flow) {
        // The wiring is gone (lb is exiting): the flow ends with the process.
        drop(lost);
    }
    Session::Finished(Outcome::Moved)
}

/// Goes on with a moved flow until it ends (or moves again); `listener`, `backend` and `lease`:
/// this process's objects for it; `adopted`: it comes from another process.
pub async fn resume(
    listener: Arc<ListenerRt>,
    backend: Arc<BackendRt>,
    lease: Lease,
    flow: MovedFlow,
    adopted: bool,
) -> Outcome {
    let l = &*listener;
    let info = FlowInfo {
        peer: flow.info.peer,
        backend,
        lease,
        http: flow.info.http.map(|h| {
            let handed = Handed {
                method: h.method,
                host: h.host,
                target: h.target,
                status: h.status,
                format: h.format,
                since: std::time::Instant::now()
                    .checked_sub(h.elapsed)
                    .unwrap_or_else(std::time::Instant::now),
                bytes_in: h.bytes_in,
                bytes_out: h.bytes_out,
                times: h.times,
            };
            (h.kind, handed)
        }),
    };
    let shared = &*l.shared;
    let Some(kernel) = &shared.kernel else {
        return Outcome::ForwardFailed(std::io::Error::other("no kernel path to resume a moved flow"));
    };
    let counters = forward::kernel::FlowCounters {
        user_bytes: shared.byte_counters(info.server()),
        dropped: &l.dropped,
        duplicated: &shared.metrics.kernel_duplicated_bytes,
        kernel_bytes: &info.server().kernel_bytes,
    };
    let token = shared.moving_token();
    let session = match forward::kernel::resume(kernel, flow.moving, &counters, &token, adopted).await {
        Ok(Forwarded::Done(end, totals)) => finish(l, info, end, totals),
        Ok(Forwarded::Moved(moving)) => hand_over(l, &info, moving),
        // A moved flow is past the hand-off: it cannot be refused.
        Ok(Forwarded::NotEligible(..)) => Session::Finished(Outcome::ForwardFailed(std::io::Error::other(
            "a moved flow was refused",
        ))),
        Err(e) => {
            tracing::error!(listener = %l.config.name, client = %info.peer, "kernel forwarding of a moved flow failed: {e}");
            log_handoff_end(l, &info, None, Totals::default());
            Session::Finished(Outcome::ForwardFailed(e))
        }
    };
    match session {
        Session::Finished(outcome) => outcome,
        // `finish` and `hand_over` end the session.
        _ => Outcome::Moved,
    }
}
