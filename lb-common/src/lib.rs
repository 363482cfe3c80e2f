//! Types shared by the kernel program (`lb-ebpf`) and the daemon (`lb-user`).
//!
//! Every type here is `#[repr(C)]` with fixed-width fields so that both sides agree on the layout
//! of a map value byte for byte; the `const` asserts below fail the build if a field is added
//! without thinking about the other side.
//!
//! The hand-off protocol between the two sides, built on [`SockCtl`], is drawn in
//! `lb-user/src/LIFECYCLE.md`.
#![no_std]

/// Name of the SOCKHASH that holds every kernel-forwarded socket. Key: the socket cookie of the
/// socket that *receives* bytes; value: the socket the bytes are redirected to (its peer).
pub const SOCKS_MAP: &str = "SOCKS";
/// Name of the index from a socket's cookie to its slot in [`FLOW_CTL_MAP`] (key: u64 cookie,
/// value: u32 slot). Written only by the daemon.
pub const SLOTS_MAP: &str = "SLOTS";
/// Name of the per-socket control state: an mmap-able array of [`SockCtl`], one slot per tracked
/// socket. The program and the daemon (through a shared mapping) each write only their own
/// fields, with single aligned stores.
pub const FLOW_CTL_MAP: &str = "FLOW_CTL";
/// Name of the ring buffer of [`Event`]s: how the program wakes the daemon for one flow.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU totals array (one element, value: [`CpuStats`]).
pub const CPU_STATS_MAP: &str = "CPU_STATS";
/// Name of the stream verdict program.
pub const VERDICT_PROG: &str = "lb_verdict";
/// Names of the program's globals holding the byte offsets of `write_seq` and `snd_una` in the
/// running kernel's `struct tcp_sock` (read from its BTF at load time: they move between
/// kernel builds).
pub const WRITE_SEQ_OFFSET_GLOBAL: &str = "WRITE_SEQ_OFFSET";
pub const SND_UNA_OFFSET_GLOBAL: &str = "SND_UNA_OFFSET";
/// Name of the global holding the byte offset of `copied_seq` in `struct tcp_sock`.
pub const COPIED_SEQ_OFFSET_GLOBAL: &str = "COPIED_SEQ_OFFSET";
/// Name of the global holding the byte offset, in `struct sk_buff`, of the sequence number TCP
/// stores in the skb's control block (`cb` + `tcp_skb_cb.seq`).
pub const SKB_SEQ_OFFSET_GLOBAL: &str = "SKB_SEQ_OFFSET";

/// Capacity of the SOCKHASH, of the slot index and of the control array: two sockets per flow.
pub const MAX_SOCKETS: u32 = 131_072;
/// Size of the event ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// `BPF_F_MMAPABLE`: lets the daemon map the control array into its memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// [`SockCtl::flags`]: the program redirects this socket's bytes to its peer. Clear: it passes
/// them to the socket's own queue ("held"), where the daemon reads them.
pub const FLAG_REDIRECTING: u32 = 1;
/// [`SockCtl::flags`]: [`SockCtl::peer_seq_base`] is set (the first redirect happened).
pub const FLAG_BASED: u32 = 2;
/// [`SockCtl::flags`]: [`SockCtl::next_seq`] is set (the program has seen an skb).
pub const FLAG_SEQ: u32 = 4;
/// [`SockCtl::flags`]: the socket's `limit` is spent for good: the skb that crossed it could
/// not be cut there, so it was dropped, and every later one is too (a body short of its end,
/// never one with bytes past it).
pub const FLAG_SPENT: u32 = 8;

/// The control state of one socket of a kernel-forwarded flow: what the program did with the
/// bytes this socket received, and what the daemon allows and has done.
///
/// Who writes what (each field has exactly one writer, so neither side can wipe the other's
/// update): the program writes `redirected`, `passed`, `peer_seq_base`, `flags`, `next_seq`
/// and `past_limit`; the daemon writes `consumed`, `allow`, `max_in_flight` and `limit` (and
/// zeroes the whole
/// slot before the socket's cookie is indexed in [`SLOTS_MAP`], when the program cannot see it
/// yet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCtl {
    /// Payload bytes redirected to the peer socket.
    pub redirected: u64,
    /// Payload bytes passed to this socket's own queue, for the daemon to read and forward.
    pub passed: u64,
    /// The peer's `write_seq` when the program first redirected, minus the bytes the daemon
    /// had written to the peer by then (wrapping). With it the program computes how many of the
    /// bytes given to the peer since (redirected or written by the daemon) its receiver has
    /// not acknowledged yet: `redirected + consumed - (snd_una - peer_seq_base)`, the bytes lb
    /// holds for this direction, which the brake bounds.
    pub peer_seq_base: u32,
    /// [`FLAG_REDIRECTING`] | [`FLAG_BASED`].
    pub flags: u32,
    /// Bytes of `passed` that the daemon has read from this socket and written to the peer.
    /// The program resumes redirecting only when `passed == consumed`: then nothing it passed
    /// is still waiting in the socket's queue, and the stream stays in order.
    pub consumed: u64,
    /// 1: the program may redirect (once `passed == consumed`); 0: it passes every byte.
    pub allow: u32,
    /// The brake: above this many bytes given to the peer and not acknowledged by its receiver
    /// (in the peer's psock queue or send queue), the program stops redirecting and passes
    /// (holds) this socket's bytes, which closes the sender's TCP window, and wakes the daemon.
    pub max_in_flight: u32,
    /// TCP sequence number just past the last byte the program took from this socket (valid
    /// with [`FLAG_SEQ`]). The kernel hands the program whole skbs, even one that TCP queued
    /// with its head overlapping bytes already taken (a retransmission that partly covers
    /// received data): the program trims that head so no byte is forwarded twice.
    pub next_seq: u32,
    /// Times the program asked the daemon to throttle the sender: while redirecting, the
    /// bytes in flight passed half of `max_in_flight`. It asks again only once the daemon has
    /// dealt with the last request (`throttles == throttles_done`).
    pub throttles: u32,
    /// Throttle requests the daemon has dealt with: it shrank this socket's receive buffer (so
    /// TCP's window, and what a brake would hold, shrink), waited until the bytes in flight
    /// fell to the low-water mark or a hold ended, and gave the buffer back.
    pub throttles_done: u32,
    /// Bytes the socket sent past `limit`, dropped by the program (saturating).
    pub past_limit: u32,
    /// 0: no limit. Else the most payload bytes the program takes from this socket
    /// (`redirected + passed`): the rest of an HTTP response body of known length, which lb
    /// hands to the kernel; whatever the server sends past it is dropped, never forwarded.
    pub limit: u64,
}

/// Why the program woke the daemon about one socket.
pub const EVENT_BRAKE: u32 = 1;
/// Bytes were passed while the daemon had caught up (allow was 0, or the peer was missing).
pub const EVENT_HELD: u32 = 2;
/// While redirecting, the bytes in flight passed half the bound: the daemon throttles the
/// sender (see [`SockCtl::throttles`]).
pub const EVENT_THROTTLE: u32 = 3;

/// One ring-buffer record: "look at this socket".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The socket's slot in [`FLOW_CTL_MAP`].
    pub slot: u32,
    /// [`EVENT_BRAKE`], [`EVENT_HELD`] or [`EVENT_THROTTLE`].
    pub kind: u32,
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
    /// Payload bytes passed to the receiving socket, for the daemon to forward.
    pub passed_bytes: u64,
    /// Zero-length skbs (a bare FIN) dropped: redirecting them breaks the peer's psock.
    pub empty_drops: u64,
    /// skbs of a socket lb does not track (passed to it).
    pub untracked: u64,
    /// Times a socket's redirection stopped because its peer lagged by more than
    /// `max_in_flight` (a hand-off kernel → user).
    pub brakes: u64,
    /// Times a socket's redirection (re)started (a hand-off user → kernel).
    pub resumes: u64,
    /// Payload bytes held back: passed to the daemon after a socket had been redirecting.
    pub held_bytes: u64,
    /// Events the ring buffer had no room for (the daemon then looks at every flow).
    pub events_lost: u64,
    /// Payload bytes at the head of skbs that the program had already taken (a retransmitted
    /// segment partly overlapping received data), trimmed off before the skb went on.
    pub trimmed_bytes: u64,
    /// skbs whose overlap could not be trimmed (the helper failed, or more than the program
    /// trims at once): their repeated bytes went on. Should stay 0.
    pub untrimmed: u64,
}

const _: () = assert!(core::mem::size_of::<SockCtl>() == 64);
const _: () = assert!(core::mem::offset_of!(SockCtl, throttles_done) == 48);
const _: () = assert!(core::mem::align_of::<SockCtl>() == 8);
const _: () = assert!(core::mem::size_of::<Event>() == 8);
const _: () = assert!(core::mem::size_of::<CpuStats>() == 96);
const _: () = assert!(core::mem::align_of::<CpuStats>() == 8);

impl CpuStats {
    /// Field-wise sum, used to fold the per-CPU values into one total.
    pub fn add(&self, o: &CpuStats) -> CpuStats {
        CpuStats {
            redirected_bytes: self.redirected_bytes + o.redirected_bytes,
            redirected_skbs: self.redirected_skbs + o.redirected_skbs,
            misses: self.misses + o.misses,
            passed_bytes: self.passed_bytes + o.passed_bytes,
            empty_drops: self.empty_drops + o.empty_drops,
            untracked: self.untracked + o.untracked,
            brakes: self.brakes + o.brakes,
            resumes: self.resumes + o.resumes,
            held_bytes: self.held_bytes + o.held_bytes,
            events_lost: self.events_lost + o.events_lost,
            trimmed_bytes: self.trimmed_bytes + o.trimmed_bytes,
            untrimmed: self.untrimmed + o.untrimmed,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), made only of u32/u64 fields, with no padding (size
    // asserts above).
    unsafe impl aya::Pod for super::SockCtl {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::CpuStats {}
}
