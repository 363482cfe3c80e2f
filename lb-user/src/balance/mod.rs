//! Server selection, the stage between a session's analysis and its connect: which server of a
//! backend a new flow (or, in HTTP mode, a new server connection) goes to (`balance:`).
//!
//! - [`roundrobin`]: smooth weighted round robin (the default);
//! - [`leastconn`]: the fewest current sessions per unit of weight;
//! - [`hash`]: `source` (the client address) and `uri` (the request path), consistent
//!   (weighted rendezvous hashing): removing one of N servers moves only its own clients;
//! - [`random`]: the power of two choices, two weighted draws and the less loaded of them.
//!
//! Each server's live state ([`ServerLive`]: its weight, which `lb server weight` may change,
//! and its current sessions) is shared by every thread. A pick returns a [`Lease`], which
//! counts the session while the caller holds it.
pub mod hash;
pub mod leastconn;
pub mod live;
pub mod random;
pub mod roundrobin;

use prometheus_client::metrics::gauge::Gauge;
use std::{net::IpAddr, sync::Arc};
use tokio::sync::Notify;

pub use live::{Admin, ServerLive, State};

use crate::config::{Backend, Balance};

/// What a pick may look at besides the servers: the client's address (`source`) and, for an
/// HTTP request, its path (`uri`).
#[derive(Debug, Clone, Copy)]
pub struct PickKey<'a> {
    pub client: IpAddr,
    pub path: Option<&'a str>,
}

/// A session's claim on the server it was given: counted in [`ServerLive::active`] until
/// dropped.
#[derive(Debug)]
pub struct Lease {
    server: Arc<ServerLive>,
    index: usize,
}

impl Lease {
    /// The server's index in its backend.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn server(&self) -> &ServerLive {
        &self.server
    }

    /// Passive checks (`observe:`): how a use of the server went (a connect, or an HTTP
    /// response: 5xx or none is a failure). `observe.max_consecutive_errors` failures in a row
    /// take it DOWN, said once in the log.
    pub fn observe(&self, ok: bool, backend: &Backend) {
        if ok {
            self.server.live_success();
        } else if self.server.live_error(backend.max_consecutive_errors) {
            let server = &backend.servers[self.index].name;
            tracing::warn!(
                backend = %backend.name,
                server = %server,
                "server is DOWN: {} errors in a row from live traffic (observe); its health check brings it back",
                backend.max_consecutive_errors.unwrap_or_default()
            );
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.server.release();
    }
}

/// A backend's balancer: its algorithm's state and its servers' live state.
pub struct Balancer {
    algorithm: Algorithm,
    servers: Vec<Arc<ServerLive>>,
    /// Sessions waiting for a server below its `maxconn` wait on this.
    queue: Arc<Notify>,
}

/// What a pick found.
#[derive(Debug)]
pub enum Pick {
    Server(Lease),
    /// Servers take new flows, but every one is at its `maxconn`: wait in [`Balancer::queue`].
    Full,
    /// No server takes new flows.
    NoServer,
}

impl Pick {
    pub fn lease(self) -> Option<Lease> {
        match self {
            Pick::Server(lease) => Some(lease),
            _ => None,
        }
    }
}

enum Algorithm {
    RoundRobin(roundrobin::RoundRobin),
    LeastConn(leastconn::LeastConn),
    Source(hash::Rendezvous),
    Uri(hash::Rendezvous),
    Random,
}

/// A server of a backend a reload changed ([`Balancer::succeed`]).
pub enum Slot {
    /// The server of that index in the old balancer.
    Kept(usize),
    /// A new server, with its `lb_backend_active_sessions` and `lb_server_up` gauges.
    New((Gauge, Gauge)),
}

impl Algorithm {
    fn of(backend: &Backend) -> Algorithm {
        let names = || backend.servers.iter().map(|s| s.name.as_str());
        match backend.balance {
            Balance::RoundRobin => Algorithm::RoundRobin(roundrobin::RoundRobin::new(backend.servers.len())),
            Balance::LeastConn => Algorithm::LeastConn(leastconn::LeastConn::default()),
            Balance::Source => Algorithm::Source(hash::Rendezvous::new(names())),
            Balance::Uri => Algorithm::Uri(hash::Rendezvous::new(names())),
            Balance::Random => Algorithm::Random,
        }
    }
}

impl Balancer {
    /// `gauges`: each server's `lb_backend_active_sessions` and `lb_server_up` gauges, in the
    /// backend's order.
    pub fn new(backend: &Backend, gauges: impl IntoIterator<Item = (Gauge, Gauge)>) -> Balancer {
        let algorithm = Algorithm::of(backend);
        let queue = Arc::new(Notify::new());
        Balancer {
            algorithm,
            servers: backend
                .servers
                .iter()
                .zip(gauges)
                .map(|(s, gauges)| Arc::new(ServerLive::new(s.weight, s.maxconn, gauges, queue.clone())))
                .collect(),
            queue,
        }
    }

    /// The balancer of `backend` after a reload changed it, in place of `old` (the same
    /// backend's): each server in `backend`'s order either keeps its live state from `old`
    /// ([`Slot::Kept`]: its health, what an operator set, its sessions) or starts anew. The
    /// queue stays, so that sessions waiting in it hear of the kept servers' freed slots.
    pub fn succeed(backend: &Backend, old: &Balancer, slots: impl IntoIterator<Item = Slot>) -> Balancer {
        let queue = old.queue.clone();
        let servers = backend
            .servers
            .iter()
            .zip(slots)
            .map(|(s, slot)| match slot {
                Slot::Kept(i) => old.servers[i].clone(),
                Slot::New(gauges) => Arc::new(ServerLive::new(s.weight, s.maxconn, gauges, queue.clone())),
            })
            .collect();
        Balancer {
            algorithm: Algorithm::of(backend),
            servers,
            queue,
        }
    }

    /// A lease on server `index` for a flow that moved in from another process (an upgrade):
    /// counted whatever its `maxconn` (the flow is under way already).
    pub fn lease_moved_in(&self, index: usize) -> Lease {
        let server = self.servers[index].clone();
        server.count_moved_in();
        Lease { server, index }
    }

    /// Each server's live state, in the backend's order.
    pub fn servers(&self) -> &[Arc<ServerLive>] {
        &self.servers
    }

    /// Where sessions wait while every server is at its `maxconn`.
    pub fn queue(&self) -> &Notify {
        &self.queue
    }

    /// The server for a new flow, counted as one of its sessions while the lease is held.
    /// Servers that do not take new flows (weight 0, down, draining, in maintenance) are left
    /// out, and so are those in `skip` (a retry redispatches away from them) and those at their
    /// `maxconn` (with a hashing algorithm, a key then goes to its next server in hash order).
    pub fn pick(&self, key: PickKey<'_>, skip: &[usize]) -> Pick {
        let mut full = Vec::new();
        // Bounded: each turn leaves one more server out.
        for _ in 0..=self.servers.len() {
            // One snapshot per pick: a weight changed meanwhile applies from the next one.
            let weights: Vec<u32> = (self.servers.iter().enumerate())
                .map(|(i, s)| {
                    if skip.contains(&i) || full.contains(&i) {
                        0
                    } else if s.is_full() && s.effective_weight() > 0 {
                        full.push(i);
                        0
                    } else {
                        s.effective_weight()
                    }
                })
                .collect();
            let Some(index) = self.choose(key, &weights) else {
                break;
            };
            let server = &self.servers[index];
            if server.try_acquire() {
                return Pick::Server(Lease {
                    server: server.clone(),
                    index,
                });
            }
            // Another thread took its last slot meanwhile.
            full.push(index);
        }
        if full.is_empty() {
            Pick::NoServer
        } else {
            Pick::Full
        }
    }

    fn choose(&self, key: PickKey<'_>, weights: &[u32]) -> Option<usize> {
        match &self.algorithm {
            Algorithm::RoundRobin(rr) => rr.pick(weights),
            Algorithm::LeastConn(lc) => lc.pick(weights, &self.active()),
            Algorithm::Source(h) => h.pick(weights, &ip_bytes(key.client)),
            // A request without a path (CONNECT, `*`) hashes as `/`.
            Algorithm::Uri(h) => h.pick(
                weights,
                key.path.filter(|p| !p.is_empty()).unwrap_or("/").as_bytes(),
            ),
            Algorithm::Random => random::pick(weights, &self.active(), &mut fastrand::Rng::new()),
        }
    }

    fn active(&self) -> Vec<u32> {
        self.servers.iter().map(|s| s.active()).collect()
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        // An IPv4 client seen through an IPv6 socket hashes as itself.
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
        IpAddr::V4(v4) => v4.octets().to_vec(),
    }
}

/// `a / wa < b / wb` for loads `a`, `b` on weights `wa`, `wb` (both non-zero), without division.
fn lighter(a: u32, wa: u32, b: u32, wb: u32) -> bool {
    u64::from(a) * u64::from(wb) < u64::from(b) * u64::from(wa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Server;

    fn backend(balance: Balance, weights: &[u32]) -> Backend {
        Backend {
            name: "b".into(),
            balance,
            connect_timeout: std::time::Duration::from_secs(1),
            server_timeout: std::time::Duration::from_secs(1),
            queue_timeout: std::time::Duration::from_secs(1),
            retries: 3,
            health_check: None,
            max_consecutive_errors: None,
            servers: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Server {
                    name: format!("s{i}"),
                    address: "127.0.0.1:1".parse().unwrap(),
                    weight,
                    maxconn: None,
                    tls: None,
                    send_proxy: None,
                })
                .collect(),
        }
    }

    fn balancer(balance: Balance, weights: &[u32]) -> Balancer {
        let gauges = weights.iter().map(|_| (Gauge::default(), Gauge::default()));
        Balancer::new(&backend(balance, weights), gauges)
    }

    const KEY: PickKey<'static> = PickKey {
        client: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        path: Some("/"),
    };

    #[test]
    fn full_servers_are_passed_over_then_waited_for() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::Source,
            Balance::Random,
        ] {
            let mut config = backend(balance, &[1, 1]);
            config.servers[0].maxconn = Some(1);
            config.servers[1].maxconn = Some(2);
            let gauges = (0..2).map(|_| (Gauge::default(), Gauge::default()));
            let b = Balancer::new(&config, gauges);
            let leases: Vec<Lease> = (0..3).map(|_| b.pick(KEY, &[]).lease().unwrap()).collect();
            assert_eq!(b.active(), [1, 2], "{balance:?}");
            assert!(matches!(b.pick(KEY, &[]), Pick::Full), "{balance:?}");
            // A slot freed is taken by the next pick, and the queue is told.
            let notified = b.queue().notified();
            drop(leases);
            assert!(b.pick(KEY, &[]).lease().is_some());
            // (Created before the release: `notify_waiters` completes it.)
            assert_ready(notified);
        }
    }

    #[test]
    fn a_freed_slot_or_a_server_back_wakes_every_waiter() {
        let mut config = backend(Balance::RoundRobin, &[1, 1]);
        config.servers[0].maxconn = Some(1);
        let gauges = (0..2).map(|_| (Gauge::default(), Gauge::default()));
        let b = Balancer::new(&config, gauges);
        let held = b.pick(KEY, &[1]).lease().unwrap();
        // Two waiters registered (as `dispatch` registers before it picks): one of them may be
        // unable to use the freed slot (it tried that server already), so both must look.
        let (first, second) = (b.queue().notified(), b.queue().notified());
        let (mut first, mut second) = (std::pin::pin!(first), std::pin::pin!(second));
        first.as_mut().enable();
        second.as_mut().enable();
        drop(held);
        assert_ready(first);
        assert_ready(second);
        // A server coming back (health, enable, weight) wakes them too.
        let waiter = b.queue().notified();
        let mut waiter = std::pin::pin!(waiter);
        waiter.as_mut().enable();
        b.servers()[1].set_admin(Admin::Ready);
        assert_ready(waiter);
        // And one going down (the waiters then find no server, and answer at once).
        let waiter = b.queue().notified();
        let mut waiter = std::pin::pin!(waiter);
        waiter.as_mut().enable();
        b.servers()[1].set_up(false);
        assert_ready(waiter);
    }

    /// Polls a future once, asserting it is ready.
    fn assert_ready(f: impl std::future::Future<Output = ()>) {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(f.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn leases_count_sessions_until_dropped() {
        let b = balancer(Balance::LeastConn, &[1, 1]);
        let first = b.pick(KEY, &[]).lease().unwrap();
        let second = b.pick(KEY, &[]).lease().unwrap();
        assert_ne!(first.index(), second.index());
        assert_eq!(b.active(), [1, 1]);
        drop(first);
        assert_eq!(b.active().iter().sum::<u32>(), 1);
        drop(second);
        assert_eq!(b.active(), [0, 0]);
    }

    #[test]
    fn a_server_at_weight_0_down_draining_or_in_maintenance_takes_no_new_flows() {
        let exclusions: [fn(&ServerLive); 4] = [
            |s| s.set_weight(0),
            |s| s.set_admin(Admin::Drain),
            |s| s.set_admin(Admin::Maint),
            |s| {
                s.set_up(false);
            },
        ];
        let algorithms = [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::Source,
            Balance::Uri,
            Balance::Random,
        ];
        for (balance, exclude) in algorithms.into_iter().flat_map(|b| exclusions.map(|e| (b, e))) {
            let b = balancer(balance, &[1, 1, 1]);
            exclude(&b.servers()[1]);
            for i in 0..300u32 {
                let ip = IpAddr::V4(i.into());
                let path = format!("/{i}");
                let key = PickKey {
                    client: ip,
                    path: Some(&path),
                };
                let lease = b.pick(key, &[]).lease().unwrap();
                assert_ne!(lease.index(), 1, "{balance:?}");
                // Redispatched away from server 0 too: server 2 is the one left.
                assert_eq!(b.pick(key, &[0]).lease().unwrap().index(), 2, "{balance:?}");
            }
            for s in b.servers() {
                exclude(s);
            }
            assert!(matches!(b.pick(KEY, &[]), Pick::NoServer), "{balance:?}");
        }
    }
}
