//! lb: an eBPF-accelerated hybrid load balancer.
//!
//! The data path, one module per stage, wired in [`daemon`]:
//! [`accept`] (generic TCP accept with the listener's flags) → [`session`] (the per-session
//! supervisor: [`balance`] picks a server, [`connect`] reaches it) → [`forward`] (kernel sockmap
//! forwarding via [`bpf`], or a userspace copy loop). HTTP listeners' sessions run the HTTP
//! supervisor and its analyzers ([`http`]) before any tunnel reaches the forwarding stage.
//! The objects the stages serve (a listener's, a backend's) are in [`runtime`]. Around it:
//! [`config`], [`metrics`] and the [`admin`] endpoint, and [`shutdown`].
pub mod accept;
pub mod admin;
pub mod admin_client;
pub mod affinity;
pub mod balance;
pub mod bpf;
pub mod config;
pub mod connect;
pub mod daemon;
pub mod dispatch;
pub mod forward;
pub mod health;
pub mod http;
pub mod metrics;
pub mod proxy_header;
pub mod reload;
pub mod runtime;
pub mod session;
pub mod shutdown;
pub mod sockopt;
pub mod stats;
pub mod stats_page;
pub mod stream;
pub mod systemd;
pub mod tls;
pub mod upgrade;
pub mod workers;

#[cfg(test)]
mod test_support;
