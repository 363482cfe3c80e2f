//! The forwarding stage: moves bytes between an accepted client and its connected server until
//! both directions are closed, then reports how the flow ended.
//!
//! Two paths with the same contract (see ../LIFECYCLE.md):
//! - [`kernel`]: both sockets go into the BPF SOCKHASH and the kernel forwards every byte; the
//!   daemon only hears about end of stream, resets and idleness.
//! - [`user`]: a tokio copy loop, used when BPF is unavailable or `forwarding: user`.
//! - [`streams`]: a copy loop for flows with a TLS side (decrypted and encrypted by lb), which
//!   neither of the others can take without kTLS.
pub mod kernel;
pub mod streams;
pub mod user;

use std::time::Duration;

/// Which end of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Client, Side::Server];

    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
    /// Position in a `[client, server]` pair.
    pub fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Server => 1,
        }
    }
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// Idle limits of one flow: `timeouts.client` and the backend's `timeouts.server`.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Timeouts {
    pub client: Duration,
    pub server: Duration,
}

impl Timeouts {
    pub fn of(&self, side: Side) -> Duration {
        match side {
            Side::Client => self.client,
            Side::Server => self.server,
        }
    }
}

/// How a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their sending direction and every byte was delivered.
    Closed,
    /// One side reset the connection (or failed); the other was reset too.
    Reset(Side),
    /// One side moved no byte for its idle timeout; both were closed.
    IdleTimeout(Side),
}

/// Where the payload bytes lb copies itself are counted: lb's total
/// (`lb_forwarded_bytes_total{path="user"}`) and the flow's server
/// (`lb_server_forwarded_bytes_total{path="user"}`).
#[derive(Debug, Clone, Copy)]
pub struct ByteCounters<'a> {
    pub total: &'a prometheus_client::metrics::counter::Counter,
    pub server: &'a prometheus_client::metrics::counter::Counter,
}

impl ByteCounters<'_> {
    pub fn add(&self, n: u64) {
        self.total.inc_by(n);
        self.server.inc_by(n);
    }
}

/// What a flow moved in the forwarding stage, for its access-log record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Bytes the kernel redirected, both ways.
    pub kernel: u64,
    /// Bytes from the server given to the client (by the kernel or by lb).
    pub to_client: u64,
    /// Bytes the server sent past the direction's limit ([`Directions::limit`]), dropped.
    pub past_limit: u64,
}

/// Which directions of a pair are forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directions {
    /// Both: a TCP flow, or an HTTP tunnel.
    Both,
    /// The server's bytes only: the rest of an HTTP response after which lb closes the
    /// connection. What the client sends is read and dropped (it is past the analysed request,
    /// pipelined requests that must never reach the server unanalysed), and so is its end of
    /// stream: a server may take a half-close for the client giving up on the response (Go's
    /// request context, nginx's client-abort check). The flow ends with the server's close.
    /// `limit`: the most bytes the server's direction forwards (the rest of a body of known
    /// length); what the server sends past it is dropped, by the program or the copy loop.
    ServerToClient { limit: Option<u64> },
}

impl Directions {
    /// The side whose bytes are dropped instead of forwarded, if any.
    pub fn dropped(self) -> Option<Side> {
        match self {
            Directions::Both => None,
            Directions::ServerToClient { .. } => Some(Side::Client),
        }
    }

    /// The most bytes the direction from `from` forwards, if bounded.
    pub fn limit(self, from: Side) -> Option<u64> {
        match (self, from) {
            (Directions::ServerToClient { limit }, Side::Server) => limit,
            _ => None,
        }
    }
}

/// Bytes lb read from a side and had not yet written to the other when the userspace copy
/// loops stopped for the hand-off, by the side they came from. A copy loop stops at once,
/// even in the middle of a write to a peer that is not reading (a serial server busy writing
/// its own answer): waiting for that write would stop the other direction too. Whichever path
/// takes the flow next writes them first, before any newer byte of their direction.
#[derive(Debug, Default)]
pub struct Unsent([Vec<u8>; 2]);

impl Unsent {
    /// The bytes still to go from `from` to its peer.
    pub fn of(&self, from: Side) -> &[u8] {
        &self.0[from.index()]
    }

    pub fn set(&mut self, from: Side, bytes: Vec<u8>) {
        self.0[from.index()] = bytes;
    }

    /// Takes the bytes of `from`'s direction out.
    pub fn take(&mut self, from: Side) -> Vec<u8> {
        std::mem::take(&mut self.0[from.index()])
    }
}
