//! The accept loops: a listener has one listening socket per session worker (SO_REUSEPORT,
//! [`accept::bind`]), and each worker runs the loop of its own socket, starting a session
//! supervisor on its own thread for each connection while the listener is below its `maxconn`
//! (slots its workers share).
//!
//! A listener's sockets are named by its address: a reload that keeps a listener's address (or
//! gives it to a listener of another name) keeps them, and their loops serve the new listener
//! from their next connection, so no connection is refused or lost in an accept queue.
//! Sockets no listener uses any more take what is in their accept queue, then close.
use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};
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

/// A listener's sockets and their loops, one per worker.
struct Loop {
    socket: Key,
    /// The sockets' descriptors (each owned by its loop's task, open while it runs).
    fds: Vec<std::os::fd::RawFd>,
    listener: watch::Sender<Arc<ListenerRt>>,
    /// The listener's `maxconn` slots, shared by its loops, which flows moved in by an upgrade
    /// take too.
    slots: Arc<Slots>,
    /// Cancelled when a reload leaves the sockets without a listener.
    removed: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Which socket a listener needs: its address (a listener on port 0, any free port, has one
/// of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key(SocketAddr, Option<String>);

fn key(l: &Listener) -> Key {
    Key(l.bind, (l.bind.port() == 0).then(|| l.name.clone()))
}

/// Sockets bound for a configuration, before it is applied: a listener's, one per worker,
/// registered with its worker's runtime.
pub(super) struct Bound(Vec<(Key, Vec<Listening>)>);

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

    /// Binds the sockets of every listener in `listeners` that has none open yet (all or
    /// none); `rcvbuf`: SO_RCVBUF ([`accept::bind`]); `inherited`: sockets an upgrade handed
    /// over, by (address, name for port 0), taken instead of binding where they match (those
    /// left are closed by the caller).
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
                let mut fds = vec![inherited.swap_remove(i).2];
                while let Some(j) = inherited
                    .iter()
                    .position(|(addr, name, _)| Key(*addr, name.clone()) == k)
                {
                    fds.push(inherited.swap_remove(j).2);
                }
                Some(self.adopt(l, fds))
            } else if !open {
                Some(accept::bind(l, rcvbuf, self.workers.len()))
            } else {
                None
            };
            match socket.map(|s| s.and_then(|s| self.register(s))) {
                Some(Ok(sockets)) => bound.push((k.clone(), sockets)),
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

    /// The sockets an upgrade handed over for `l`: one per worker when the thread counts
    /// match. With fewer than workers (more threads now, or the one socket of an lb before
    /// per-thread accept), the first is shared by the workers left: each is woken by every
    /// connection to it, and one takes it. (None is bound beside them: until the old process
    /// confirms the upgrade, a socket that joined the group would take connections that its
    /// close resets if the upgrade fails.) More than workers are served all the same, several
    /// by a worker.
    fn adopt(&self, l: &Listener, fds: Vec<OwnedFd>) -> std::io::Result<Vec<std::net::TcpListener>> {
        let mut sockets = Vec::new();
        for fd in fds {
            let socket = accept::adopt(fd)?;
            accept::adjust(&socket, l)?;
            sockets.push(socket);
        }
        while sockets.len() < self.workers.len() {
            let shared = sockets[0].try_clone()?;
            sockets.push(shared);
        }
        Ok(sockets)
    }

    /// Registers socket `i` with worker `i`'s runtime (round robin), which accepts on it.
    fn register(&self, sockets: Vec<std::net::TcpListener>) -> std::io::Result<Vec<Listening>> {
        sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                let _runtime = self.workers.handle(i).enter();
                Listening::register(socket)
            })
            .collect()
    }

    /// Every listening socket, for an upgrade: its listener's address (and name, on port 0)
    /// and its descriptor.
    pub(super) fn handed(&self) -> Vec<crate::upgrade::Handed> {
        self.loops
            .iter()
            .flat_map(|lp| {
                lp.fds.iter().map(|&fd| crate::upgrade::Handed {
                    bind: lp.socket.0,
                    name: lp.socket.1.clone(),
                    fd,
                })
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
                // Once, here: each loop adjusts its own socket's options.
                lp.slots.resize(listener.config.maxconn);
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
            self.closing.extend(lp.tasks);
        }
    }

    fn start(&self, socket: Key, listener: Arc<ListenerRt>, sockets: Vec<Listening>) -> Loop {
        let l = &listener.config;
        let local = sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(
            "listener `{}` listening on {local} (mode {}{}, backend `{}`; {} socket(s))",
            l.name,
            if l.http.is_some() { "http" } else { "tcp" },
            if l.tls.is_some() { " over TLS" } else { "" },
            listener.default_backend().config.name,
            sockets.len()
        );
        let slots = Arc::new(Slots::new(l.maxconn));
        let (sender, receiver) = watch::channel(listener);
        let removed = CancellationToken::new();
        let fds = sockets.iter().map(|s| s.socket().as_raw_fd()).collect();
        let tasks = sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                let ends = Ends {
                    stop: self.stop.clone(),
                    removed: removed.clone(),
                    // The loop's own child: its sessions wait on a token no other thread's
                    // sessions register with.
                    abort: self.abort.child_token(),
                };
                self.workers.handle(i).spawn(accept_loop(
                    receiver.clone(),
                    socket,
                    slots.clone(),
                    ends,
                    self.sessions.clone(),
                ))
            })
            .collect();
        Loop {
            socket,
            fds,
            listener: sender,
            slots,
            removed,
            tasks,
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
            .and_then(|lp| {
                // A slot owed to a lower `maxconn` is forgotten, as the loops do.
                loop {
                    let permit = lp.slots.semaphore.clone().try_acquire_owned().ok()?;
                    if !lp.slots.repay() {
                        return Some(permit);
                    }
                    permit.forget();
                }
            });
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
        for task in self.loops.into_iter().flat_map(|lp| lp.tasks).chain(self.closing) {
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
    /// The limit, and the slots to take out of use as they come back (a lower `maxconn` while
    /// they were taken).
    books: Mutex<Books>,
}

struct Books {
    limit: usize,
    owed: usize,
}

impl Slots {
    fn new(limit: u32) -> Slots {
        Slots {
            semaphore: Arc::new(Semaphore::new(limit as usize)),
            books: Mutex::new(Books {
                limit: limit as usize,
                owed: 0,
            }),
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        // The books hold two numbers, consistent after every statement: a panic elsewhere
        // while the lock was held left them usable.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn resize(&self, limit: u32) {
        let limit = limit as usize;
        let mut b = self.books();
        if limit > b.limit {
            let more = limit - b.limit;
            let repaid = more.min(b.owed);
            b.owed -= repaid;
            self.semaphore.add_permits(more - repaid);
        } else {
            let fewer = b.limit - limit;
            b.owed += fewer - self.semaphore.forget_permits(fewer);
        }
        b.limit = limit;
    }

    /// Whether a slot just taken is one owed (to be forgotten, not used).
    fn repay(&self) -> bool {
        let mut b = self.books();
        if b.owed > 0 {
            b.owed -= 1;
            true
        } else {
            false
        }
    }
}

/// A worker's loop over one of the listener's sockets: takes each connection while the
/// listener is below its `maxconn` and runs its session on this worker.
///
/// The loop waits for a connection first, then for a slot: a loop waiting for a connection
/// holds no slot, which another worker's socket may need for the connection it has.
async fn accept_loop(
    mut listener: watch::Receiver<Arc<ListenerRt>>,
    socket: Listening,
    slots: Arc<Slots>,
    ends: Ends,
    sessions: TaskTracker,
) {
    // What ends the loop or changes its listener, waited on across connections (a change
    // re-arms it): no per-connection registration with a token other threads use.
    let mut control = std::pin::pin!(control_of(&ends, listener.clone()));
    loop {
        let taken = tokio::select! {
            biased;
            c = &mut control => Err(c),
            t = ready_then_slot(&socket, &slots) => Ok(t),
        };
        let (ready, permit) = match taken {
            Err(Control::Stop) => return,
            Err(Control::Removed) => break,
            // A change applies at once, not at the next connection.
            Err(Control::Changed(rx)) => {
                listener = rx;
                adjust(&listener.borrow_and_update(), &socket);
                control.set(control_of(&ends, listener.clone()));
                continue;
            }
            Ok(Ok(Some(taken))) => taken,
            // The slots are never closed.
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(listener = %listener.borrow().config.name, "listening socket failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if slots.repay() {
            permit.forget();
            continue;
        }
        match ready.accept() {
            Ok(Some((stream, peer))) => {
                let current = listener.borrow().clone();
                spawn_session(current, stream, peer, permit, &ends.abort, &sessions);
            }
            // Another worker sharing the socket took it (the slot goes back).
            Ok(None) => {}
            Err(e) => {
                // Out of fds or memory: pause instead of spinning on the error.
                tracing::warn!(listener = %listener.borrow().config.name, "accept failed: {e}");
                drop(permit);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Removed by a reload: the connections the kernel completed already are served (closing
    // the socket would reset them), then the socket closes. (Beyond `maxconn`: each is a
    // client that connected while the listener existed.)
    let current = listener.borrow().clone();
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        match socket.try_accept() {
            Ok(Some((stream, peer))) => {
                spawn_session(current.clone(), stream, peer, (), &ends.abort, &sessions);
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

/// Waits for a connection in the socket's queue, then for a slot (`None`: the slots were
/// closed).
async fn ready_then_slot<'a>(
    socket: &'a Listening,
    slots: &Slots,
) -> std::io::Result<Option<(accept::Ready<'a>, tokio::sync::OwnedSemaphorePermit)>> {
    let ready = socket.ready().await?;
    Ok(slots
        .semaphore
        .clone()
        .acquire_owned()
        .await
        .ok()
        .map(|p| (ready, p)))
}

/// What a loop's control future saw.
enum Control {
    Stop,
    Removed,
    /// The listener changed (or its sender is gone: `Removed` then): the receiver, marked seen
    /// by the caller.
    Changed(watch::Receiver<Arc<ListenerRt>>),
}

/// The loop's control future: resolves when lb stops, the listener is removed, or changed.
fn control_of(
    ends: &Ends,
    mut listener: watch::Receiver<Arc<ListenerRt>>,
) -> impl std::future::Future<Output = Control> + use<> {
    let (stop, removed) = (ends.stop.clone(), ends.removed.clone());
    async move {
        tokio::select! {
            biased;
            () = stop.cancelled() => Control::Stop,
            () = removed.cancelled() => Control::Removed,
            changed = listener.changed() => match changed {
                Ok(()) => Control::Changed(listener),
                Err(_) => Control::Removed,
            },
        }
    }
}

/// A reload changed the socket's listener: the options accepted sockets inherit (its `maxconn`
/// is the [`Acceptors::apply`]'s to change, once for all the listener's sockets).
fn adjust(listener: &ListenerRt, socket: &Listening) {
    if let Err(e) = accept::adjust(socket.socket(), &listener.config) {
        tracing::warn!(listener = %listener.config.name, "cannot change the listening socket's options: {e}");
    }
}

/// Runs a session for an accepted connection on this worker (the loop's own runtime).
fn spawn_session<P: Send + 'static>(
    listener: Arc<ListenerRt>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: P,
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
    sessions.spawn(session);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_maxconn_takes_slots_back_as_they_are_returned() {
        let slots = Slots::new(4);
        let held: Vec<_> = (0..3)
            .map(|_| slots.semaphore.clone().try_acquire_owned().unwrap())
            .collect();
        // 3 taken, 1 free: down to 2 takes the free one now and owes one more.
        slots.resize(2);
        assert_eq!((slots.semaphore.available_permits(), slots.books().owed), (0, 1));
        // Up to 3 again: the debt is forgiven first, nothing added.
        slots.resize(3);
        assert_eq!((slots.semaphore.available_permits(), slots.books().owed), (0, 0));
        drop(held);
        assert_eq!(slots.semaphore.available_permits(), 3);
        slots.resize(5);
        assert_eq!(slots.semaphore.available_permits(), 5);
    }
}
