//! The accept loops: one per listening socket, each handing its connections to session
//! supervisors on the workers, while below its listener's `maxconn`.
//!
//! A listening socket is named by its address: a reload that keeps a listener's address (or
//! gives it to a listener of another name) keeps the socket, and its loop serves the new
//! listener from its next connection, so no connection is refused or lost in an accept queue.
//! A socket no listener uses any more takes what is in its accept queue, then closes.
use std::{net::SocketAddr, os::fd::OwnedFd, sync::Arc, time::Duration};
use tokio::{
    sync::{watch, Semaphore},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::StartError;
use crate::{
    accept::{self, Listening},
    config::Listener,
    runtime::{Generation, ListenerRt},
    session,
    workers::Workers,
};

/// Most connections a closing socket still takes from its accept queue.
const DRAIN_LIMIT: usize = 65_536;

/// The running accept loops.
pub(super) struct Acceptors {
    loops: Vec<Loop>,
    /// Loops of closed sockets, still draining their accept queue.
    closing: Vec<JoinHandle<()>>,
    workers: Arc<Workers>,
    /// Cancelled when lb stops: every loop stops accepting.
    stop: CancellationToken,
    /// Cancelled when the grace period is over: open sessions end.
    abort: CancellationToken,
    sessions: TaskTracker,
}

struct Loop {
    socket: Key,
    /// The socket's descriptor (owned by the loop's task, open while it runs).
    fd: std::os::fd::RawFd,
    listener: watch::Sender<Arc<ListenerRt>>,
    /// The loop's `maxconn` slots, which flows moved in by an upgrade take too.
    slots: Arc<Semaphore>,
    /// Cancelled when a reload leaves the socket without a listener.
    removed: CancellationToken,
    task: JoinHandle<()>,
}

/// Which socket a listener needs: its address (a listener on port 0, any free port, has one
/// of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key(SocketAddr, Option<String>);

fn key(l: &Listener) -> Key {
    Key(l.bind, (l.bind.port() == 0).then(|| l.name.clone()))
}

/// Sockets bound for a configuration, before it is applied.
pub(super) struct Bound(Vec<(Key, Listening)>);

impl Acceptors {
    pub(super) fn new(
        workers: Arc<Workers>,
        stop: CancellationToken,
        abort: CancellationToken,
        sessions: TaskTracker,
    ) -> Acceptors {
        Acceptors {
            loops: Vec::new(),
            closing: Vec::new(),
            workers,
            stop,
            abort,
            sessions,
        }
    }

    /// Binds the socket of every listener in `listeners` that has none open yet (all or none);
    /// `rcvbuf`: SO_RCVBUF ([`accept::bind`]); `inherited`: sockets an upgrade handed over, by
    /// (address, name for port 0), taken instead of binding where they match (those left are
    /// closed by the caller).
    pub(super) fn bind(
        &self,
        listeners: &[Listener],
        rcvbuf: Option<u32>,
        inherited: &mut Vec<(SocketAddr, Option<String>, OwnedFd)>,
    ) -> Result<Bound, Vec<StartError>> {
        let mut claimed: Vec<Key> = Vec::new();
        let mut bound = Vec::new();
        let mut errors = Vec::new();
        for l in listeners {
            let k = key(l);
            // A second listener on an address binds, and fails with its error.
            let open = self.loops.iter().any(|lp| lp.socket == k) && !claimed.contains(&k);
            let handed = inherited
                .iter()
                .position(|(addr, name, _)| Key(*addr, name.clone()) == k && !claimed.contains(&k));
            let failed = |source| StartError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            };
            let socket = if let Some(i) = handed.filter(|_| !open) {
                let (_, _, fd) = inherited.swap_remove(i);
                Some(Listening::adopt(fd).and_then(|s| s.adjust(l).map(|()| s)))
            } else if !open {
                Some(accept::bind(l, rcvbuf))
            } else {
                None
            };
            match socket {
                Some(Ok(socket)) => bound.push((k.clone(), socket)),
                Some(Err(e)) => errors.push(failed(e)),
                None => {}
            }
            claimed.push(k);
        }
        // Every address that cannot be bound is said, not only the first.
        if errors.is_empty() {
            Ok(Bound(bound))
        } else {
            Err(errors)
        }
    }

    /// Every listening socket, for an upgrade: its listener's address (and name, on port 0)
    /// and its descriptor.
    pub(super) fn handed(&self) -> Vec<crate::upgrade::Handed> {
        self.loops
            .iter()
            .map(|lp| crate::upgrade::Handed {
                bind: lp.socket.0,
                name: lp.socket.1.clone(),
                fd: lp.fd,
            })
            .collect()
    }

    /// Serves `generation`'s listeners: a socket that stays takes its new listener (and its
    /// socket options), one `bound` for it starts a loop, and one no listener uses any more
    /// closes.
    pub(super) fn apply(&mut self, generation: &Generation, bound: Bound) {
        let mut bound = bound.0;
        let mut kept = Vec::new();
        for listener in &generation.listeners {
            let k = key(&listener.config);
            if let Some(i) = self.loops.iter().position(|lp| lp.socket == k) {
                let lp = self.loops.swap_remove(i);
                lp.listener.send_replace(listener.clone());
                kept.push(lp);
            } else if let Some(i) = bound.iter().position(|(b, _)| *b == k) {
                let (k, socket) = bound.swap_remove(i);
                kept.push(self.start(k, listener.clone(), socket));
            }
        }
        for lp in std::mem::replace(&mut self.loops, kept) {
            tracing::info!(
                "listening socket {} closed: no listener uses it any more",
                lp.socket.0
            );
            lp.removed.cancel();
            self.closing.push(lp.task);
        }
    }

    fn start(&self, socket: Key, listener: Arc<ListenerRt>, listening: Listening) -> Loop {
        let l = &listener.config;
        let local = listening.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            "listener `{}` listening on {local} (mode {}{}, backend `{}`)",
            l.name,
            if l.http.is_some() { "http" } else { "tcp" },
            if l.tls.is_some() { " over TLS" } else { "" },
            listener.default_backend().config.name
        );
        let slots = Slots::new(l.maxconn);
        let semaphore = slots.semaphore.clone();
        let (sender, receiver) = watch::channel(listener);
        let removed = CancellationToken::new();
        let fd = listening.raw_fd();
        let task = tokio::spawn(accept_loop(
            receiver,
            listening,
            slots,
            self.workers.clone(),
            Ends {
                stop: self.stop.clone(),
                removed: removed.clone(),
                abort: self.abort.clone(),
            },
            self.sessions.clone(),
        ));
        Loop {
            socket,
            fd,
            listener: sender,
            slots: semaphore,
            removed,
            task,
        }
    }

    /// Runs a moved kernel flow to its end in a session on a worker (see [`super::moves`]).
    pub(super) fn spawn_resumed(
        &self,
        listener: Arc<ListenerRt>,
        backend: Arc<crate::runtime::BackendRt>,
        lease: crate::balance::Lease,
        flow: crate::session::MovedFlow,
        adopted: bool,
    ) {
        let abort = self.abort.clone();
        // The flow takes one of its listener's `maxconn` slots, so that new connections wait
        // for it as for any other. A flow that finds none (more moved in than the limit now
        // allows) goes on all the same, slotless: it gives nothing back when it ends.
        let permit = self
            .loops
            .iter()
            .find(|lp| lp.listener.borrow().config.name == listener.config.name)
            .and_then(|lp| lp.slots.clone().try_acquire_owned().ok());
        let session = async move {
            let active = listener.active.clone();
            active.inc();
            tokio::select! {
                _ = session::resume(listener, backend, lease, flow, adopted) => {}
                _ = abort.cancelled() => {}
            }
            active.dec();
            drop(permit);
        };
        self.sessions.spawn_on(session, self.workers.next());
    }

    /// Waits until the sockets a reload closed are closed (each loop takes what is in its
    /// accept queue, which does not wait).
    pub(super) async fn closed(&mut self) {
        for task in self.closing.drain(..) {
            let _ = task.await;
        }
    }

    /// Waits for every loop to end (after lb's stop).
    pub(super) async fn join(self) {
        for task in self.loops.into_iter().map(|lp| lp.task).chain(self.closing) {
            let _ = task.await;
        }
    }
}

/// What ends a loop, or its sessions.
struct Ends {
    stop: CancellationToken,
    removed: CancellationToken,
    abort: CancellationToken,
}

/// The listener's `maxconn` as slots: a lower one takes effect as sessions end.
struct Slots {
    semaphore: Arc<Semaphore>,
    limit: usize,
    /// Slots to take out of use as they come back (a lower `maxconn` while they were taken).
    owed: usize,
}

impl Slots {
    fn new(limit: u32) -> Slots {
        Slots {
            semaphore: Arc::new(Semaphore::new(limit as usize)),
            limit: limit as usize,
            owed: 0,
        }
    }

    fn resize(&mut self, limit: u32) {
        let limit = limit as usize;
        if limit > self.limit {
            let more = limit - self.limit;
            let repaid = more.min(self.owed);
            self.owed -= repaid;
            self.semaphore.add_permits(more - repaid);
        } else {
            let fewer = self.limit - limit;
            self.owed += fewer - self.semaphore.forget_permits(fewer);
        }
        self.limit = limit;
    }
}

/// Accepts connections while below the listener's maxconn and spawns a session for each on the
/// next worker.
async fn accept_loop(
    mut listener: watch::Receiver<Arc<ListenerRt>>,
    socket: Listening,
    mut slots: Slots,
    workers: Arc<Workers>,
    ends: Ends,
    sessions: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            biased;
            _ = ends.stop.cancelled() => return,
            _ = ends.removed.cancelled() => break,
            changed = listener.changed() => {
                match changed {
                    Ok(()) => changes(&listener.borrow_and_update(), &socket, &mut slots),
                    Err(_) => break,
                }
                continue;
            }
            p = slots.semaphore.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        if slots.owed > 0 {
            slots.owed -= 1;
            permit.forget();
            continue;
        }
        let (stream, peer) = tokio::select! {
            biased;
            _ = ends.stop.cancelled() => return,
            _ = ends.removed.cancelled() => break,
            // A change applies at once, not at the next connection (the permit goes back).
            changed = listener.changed() => {
                match changed {
                    Ok(()) => changes(&listener.borrow_and_update(), &socket, &mut slots),
                    Err(_) => break,
                }
                continue;
            }
            r = socket.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds or memory: pause instead of spinning on the error.
                    tracing::warn!(listener = %listener.borrow().config.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let current = listener.borrow().clone();
        spawn_session(current, stream, peer, permit, &workers, &ends.abort, &sessions);
    }
    // Removed by a reload: the connections the kernel completed already are served (closing
    // the socket would reset them), then the socket closes. (Beyond `maxconn`: each is a
    // client that connected while the listener existed.)
    let current = listener.borrow().clone();
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        match socket.try_accept() {
            Ok(Some((stream, peer))) => {
                spawn_session(
                    current.clone(),
                    stream,
                    peer,
                    (),
                    &workers,
                    &ends.abort,
                    &sessions,
                );
                drained += 1;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(listener = %current.config.name, "accept failed: {e}");
                break;
            }
        }
    }
}

/// A reload changed the socket's listener: the options accepted sockets inherit, and maxconn.
fn changes(listener: &ListenerRt, socket: &Listening, slots: &mut Slots) {
    if let Err(e) = socket.adjust(&listener.config) {
        tracing::warn!(listener = %listener.config.name, "cannot change the listening socket's options: {e}");
    }
    slots.resize(listener.config.maxconn);
}

fn spawn_session<P: Send + 'static>(
    listener: Arc<ListenerRt>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: P,
    workers: &Workers,
    abort: &CancellationToken,
    sessions: &TaskTracker,
) {
    listener.connections.inc();
    let abort = abort.clone();
    let session = async move {
        let accepted = match accept::configure(&listener.config, stream, peer) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = %listener.config.name, client = %peer, "cannot configure accepted socket: {e}");
                return;
            }
        };
        let active = listener.active.clone();
        active.inc();
        tokio::select! {
            _ = session::run(listener, accepted) => {}
            _ = abort.cancelled() => {}
        }
        active.dec();
        drop(permit);
    };
    sessions.spawn_on(session, workers.next());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_maxconn_takes_slots_back_as_they_are_returned() {
        let mut slots = Slots::new(4);
        let held: Vec<_> = (0..3)
            .map(|_| slots.semaphore.clone().try_acquire_owned().unwrap())
            .collect();
        // 3 taken, 1 free: down to 2 takes the free one now and owes one more.
        slots.resize(2);
        assert_eq!((slots.semaphore.available_permits(), slots.owed), (0, 1));
        // Up to 3 again: the debt is forgiven first, nothing added.
        slots.resize(3);
        assert_eq!((slots.semaphore.available_permits(), slots.owed), (0, 0));
        drop(held);
        assert_eq!(slots.semaphore.available_permits(), 3);
        slots.resize(5);
        assert_eq!(slots.semaphore.available_permits(), 5);
    }
}
