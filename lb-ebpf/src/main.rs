//! The kernel half of lb's forwarding stage: one `sk_skb` stream_verdict program attached to the
//! SOCKHASH that holds both sockets of every kernel-forwarded flow.
//!
//! For each skb a socket receives, the program looks up the socket's own cookie in the SOCKHASH,
//! where the daemon stored the flow's other socket, and redirects the skb to that socket's egress.
//! Nothing else: framing, timeouts and close handling are the daemon's.
//!
//! The program lives in `verdict.rs`; it is compiled only for the BPF target (lb-user's build
//! script builds it with aya-build). On the host this binary is an empty stub so that
//! `cargo build --workspace` and `cargo test --workspace` stay green.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
