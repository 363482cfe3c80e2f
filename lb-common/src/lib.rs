//! Types shared by the kernel program (`lb-ebpf`) and the daemon (`lb-user`).
//!
//! Every type here is `#[repr(C)]` with fixed-width fields so that both sides agree on the layout
//! of a map value byte for byte; the `const` asserts below fail the build if a field is added
//! without thinking about the other side.
#![no_std]

/// Name of the SOCKHASH that holds every kernel-forwarded socket. Key: the socket cookie of the
/// socket that *receives* bytes; value: the socket the bytes are redirected to (its peer).
pub const SOCKS_MAP: &str = "SOCKS";
/// Name of the per-socket counters map (key: socket cookie, value: [`SockCounters`]).
pub const SOCK_COUNTERS_MAP: &str = "SOCK_COUNTERS";
/// Name of the per-CPU totals array (one element, value: [`CpuStats`]).
pub const CPU_STATS_MAP: &str = "CPU_STATS";
/// Name of the stream verdict program.
pub const VERDICT_PROG: &str = "lb_verdict";

/// Capacity of the SOCKHASH and of the counters map: two sockets per flow.
pub const MAX_SOCKETS: u32 = 131_072;

/// What the verdict program did with the bytes one socket received.
///
/// Written only by the program (the daemon inserts a zeroed value before the socket enters the
/// SOCKHASH and deletes it after the socket left): a map update from the daemon would replace the
/// whole value and wipe an increment the program made at the same time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCounters {
    /// Payload bytes redirected to the peer socket.
    pub redirected_bytes: u64,
    /// Payload bytes passed to the receiving socket's own queue, where the daemon reads them:
    /// bytes that found no peer in the map, and every byte after them (once a socket's bytes
    /// are copied by the daemon, the program keeps passing them, so the stream stays in order).
    pub passed_bytes: u64,
}

/// Totals over every socket, one value per CPU (index 0 of a per-CPU array): cheap to update
/// without contention, summed by the daemon when it reports metrics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Payload bytes redirected socket to socket.
    pub redirected_bytes: u64,
    /// skbs redirected.
    pub redirected_skbs: u64,
    /// skbs whose socket had no peer in the map (passed to the socket itself).
    pub misses: u64,
    /// Payload bytes passed to the receiving socket (misses and the bytes after them).
    pub passed_bytes: u64,
    /// Zero-length skbs (a bare FIN) dropped: redirecting them breaks the peer's psock.
    pub empty_drops: u64,
    /// skbs redirected for a socket that had no counters entry.
    pub untracked: u64,
}

const _: () = assert!(core::mem::size_of::<SockCounters>() == 16);
const _: () = assert!(core::mem::align_of::<SockCounters>() == 8);
const _: () = assert!(core::mem::size_of::<CpuStats>() == 48);
const _: () = assert!(core::mem::align_of::<CpuStats>() == 8);

impl CpuStats {
    /// Field-wise sum, used to fold the per-CPU values into one total.
    pub fn add(&self, other: &CpuStats) -> CpuStats {
        CpuStats {
            redirected_bytes: self.redirected_bytes + other.redirected_bytes,
            redirected_skbs: self.redirected_skbs + other.redirected_skbs,
            misses: self.misses + other.misses,
            passed_bytes: self.passed_bytes + other.passed_bytes,
            empty_drops: self.empty_drops + other.empty_drops,
            untracked: self.untracked + other.untracked,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), made only of u64 fields, with no padding (size asserts above).
    unsafe impl aya::Pod for super::SockCounters {}
    unsafe impl aya::Pod for super::CpuStats {}
}
