//! Wiring for kernel flows that move (an upgrade): stopping every kernel flow of this process
//! for the move ([`move_out`]), and resuming moved flows in sessions of this process
//! ([`resume_all`]): flows moved in from the old process, or this process's own when the new
//! one failed (or one that stopped for a move after the upgrade gave up on it).
use std::{sync::Arc, time::Duration};
use tokio::{sync::mpsc::UnboundedReceiver, time::Instant};

use super::acceptors::Acceptors;
use crate::{
    balance::Lease,
    config::{Backend, Balance, Server},
    metrics::Metrics,
    runtime::{BackendRt, Generation, ListenerRt, Runtime},
    session::{MovedFlow, MovedInfo},
};

/// How long every kernel flow has to stop for a move (each stops at its next point where
/// nothing is half written: at once, or after the write under way).
const MOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops every kernel flow for a move and collects them; the program's events then wait in
/// the ring buffer for the new process. `Err`: some did not stop in time (those that did are
/// given back, and the kernel path is this process's again).
pub(super) async fn move_out(
    rt: &Runtime,
    moved: &mut UnboundedReceiver<MovedFlow>,
    acceptors: &Acceptors,
) -> Result<Vec<MovedFlow>, String> {
    let Some(kernel) = &rt.shared.kernel else {
        return Ok(Vec::new());
    };
    // New flows stay in userspace from now on (they finish in this process).
    kernel.close_to_new_flows(true);
    let before = kernel.moved_flows();
    rt.shared.move_kernel_flows();
    let deadline = Instant::now() + MOVE_TIMEOUT;
    let mut flows = Vec::new();
    loop {
        while let Ok(flow) = moved.try_recv() {
            flows.push(flow);
        }
        let expected = kernel.moved_flows() - before;
        // No socket tracked: every flow has stopped (or ended), those setting up included.
        if kernel.tracked_sockets() == 0 && flows.len() as u64 >= expected {
            break;
        }
        if Instant::now() >= deadline {
            let left = kernel.flows();
            rt.shared.stay();
            resume_all(rt, flows, false, acceptors);
            kernel.close_to_new_flows(false);
            return Err(format!(
                "{left} kernel flow(s) did not stop for the move within {MOVE_TIMEOUT:?}; the flows stay here"
            ));
        }
        tokio::select! {
            Some(flow) = moved.recv() => flows.push(flow),
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
    kernel.pause_events().await;
    Ok(flows)
}

/// The move failed: the kernel path and the flows are this process's again.
pub(super) fn move_back(rt: &Runtime, flows: Vec<MovedFlow>, acceptors: &Acceptors) {
    let Some(kernel) = &rt.shared.kernel else {
        return;
    };
    if let Err(e) = kernel.resume_events() {
        tracing::error!("cannot read the program's events again: {e}");
    }
    rt.shared.stay();
    resume_all(rt, flows, false, acceptors);
    kernel.close_to_new_flows(false);
}

/// Resumes each moved flow in a session on a worker; `adopted`: they come from another
/// process.
pub(super) fn resume_all(rt: &Runtime, flows: Vec<MovedFlow>, adopted: bool, acceptors: &Acceptors) {
    if flows.is_empty() {
        return;
    }
    let current = rt.current();
    let count = flows.len();
    for flow in flows {
        match objects(&current, rt, &flow.info) {
            Some((listener, backend, lease)) => {
                acceptors.spawn_resumed(listener, backend, lease, flow, adopted)
            }
            None => tracing::error!(
                listener = %flow.info.listener,
                client = %flow.info.peer,
                "a moved flow has no listener to go on under: closed"
            ),
        }
    }
    tracing::info!(
        "{count} kernel flow(s) {}",
        if adopted {
            "moved in from the old process"
        } else {
            "back in this process"
        }
    );
}

/// This process's listener, backend and server for a moved flow: by name in the running
/// generation; one the file no longer has stands apart, its counters exported nowhere.
fn objects(
    current: &Generation,
    rt: &Runtime,
    info: &MovedInfo,
) -> Option<(Arc<ListenerRt>, Arc<BackendRt>, Lease)> {
    let listener = match current.listener(&info.listener) {
        Some(l) => l.clone(),
        None => {
            let mut config = current.listeners.first()?.config.clone();
            config.name = info.listener.clone();
            let orphan = ListenerRt::new(
                config,
                rt.shared.clone(),
                current.settings.clone(),
                current.backends.clone(),
                None,
            );
            orphan.retire();
            rt.shared.metrics.forget_listener(&info.listener);
            Arc::new(orphan)
        }
    };
    let kept = current.backend(&info.backend).and_then(|b| {
        let i = b.config.servers.iter().position(|s| s.name == info.server)?;
        Some((b.clone(), b.balancer.lease_moved_in(i)))
    });
    let (backend, lease) = kept.unwrap_or_else(|| {
        let orphan = BackendRt::new(orphan_backend(info, &listener), &Metrics::new());
        orphan.retire();
        let lease = orphan.balancer.lease_moved_in(0);
        (Arc::new(orphan), lease)
    });
    Some((listener, backend, lease))
}

/// A backend of one server for a flow whose backend or server the file no longer has.
fn orphan_backend(info: &MovedInfo, listener: &ListenerRt) -> Backend {
    let timeout = listener.config.client_timeout;
    Backend {
        name: info.backend.clone(),
        balance: Balance::RoundRobin,
        connect_timeout: timeout,
        server_timeout: timeout,
        queue_timeout: timeout,
        retries: 0,
        health_check: None,
        max_consecutive_errors: None,
        servers: vec![Server {
            name: info.server.clone(),
            address: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            weight: 1,
            maxconn: None,
            tls: None,
            send_proxy: None,
        }],
    }
}
