//! Host-side stub: lb-ebpf's real artifact is the `lb` eBPF binary built for bpfel-unknown-none
//! by lb-user's build script. This library only exists so lb-user can depend on the crate.
#![no_std]
