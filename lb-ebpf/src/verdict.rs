//! The stream verdict program (compiled for the BPF target only; see main.rs).
//!
//! Per skb a socket receives, it decides between redirecting the bytes to the socket's peer
//! (the kernel forwards them) and passing them to the socket's own queue (the daemon reads and
//! forwards them: "held"), following the socket's [`SockCtl`]. The protocol is drawn in
//! lb-user/src/LIFECYCLE.md; in short:
//! - held → redirecting only when the daemon allows it and has forwarded every byte passed so
//!   far (`passed == consumed`), so no redirected byte can overtake a held one;
//! - redirecting → held (the brake) when the peer's receiver has not acknowledged more than
//!   `max_in_flight` of the bytes given to it: the bytes then stay charged to this socket's
//!   receive buffer, TCP's window closes on the sender, and the daemon is woken through the
//!   ring buffer;
//! - half way there, still redirecting, the daemon is asked to throttle the sender (once per
//!   request it has dealt with).
//!
//! Before either, it trims bytes it has already taken off the head of the skb (see
//! [`take_new_bytes`]).
use aya_ebpf::{
    bindings::{
        __sk_buff,
        sk_action::{SK_DROP, SK_PASS},
    },
    cty::c_void,
    helpers::{
        bpf_get_socket_cookie, bpf_probe_read_kernel,
        generated::{
            bpf_loop, bpf_map_lookup_elem, bpf_sk_release, bpf_skb_adjust_room, bpf_skb_change_tail,
            bpf_skc_to_tcp_sock,
        },
    },
    macros::{map, stream_verdict},
    maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    CpuStats, Event, SockCtl, BPF_F_MMAPABLE, EVENTS_BYTES, EVENT_BRAKE, EVENT_HELD, EVENT_THROTTLE,
    FLAG_BASED, FLAG_REDIRECTING, FLAG_SEQ, FLAG_SPENT, MAX_SOCKETS,
};

#[map(name = "SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "SLOTS")]
static SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "FLOW_CTL")]
static FLOW_CTL: Array<SockCtl> = Array::with_max_entries(MAX_SOCKETS, BPF_F_MMAPABLE);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "CPU_STATS")]
static CPU_STATS: PerCpuArray<CpuStats> = PerCpuArray::with_max_entries(1, 0);

/// Byte offsets of `write_seq` and `snd_una` in the running kernel's `struct tcp_sock`, set by
/// the daemon from the kernel's BTF when it loads the program (they move between kernel builds).
#[unsafe(no_mangle)]
static WRITE_SEQ_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SND_UNA_OFFSET: u32 = 0;
/// Byte offset of `copied_seq` in `struct tcp_sock`, and of TCP's sequence number in `struct
/// sk_buff` (`cb` + `tcp_skb_cb.seq`), from the kernel's BTF likewise.
#[unsafe(no_mangle)]
static COPIED_SEQ_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SKB_SEQ_OFFSET: u32 = 0;

/// `bpf_skb_adjust_room` removes at most this many bytes per call.
const TRIM_STEP: u64 = 4095;
/// Calls per skb, bounding the loop: 512 × 4095 B is just under 2 MiB. The overlap can exceed
/// one segment: TCP coalesces out-of-order segments into one skb, and one seen here repeated
/// 256 KiB. An skb holds at most MAX_SKB_FRAGS (17 by default, 45 at most) page fragments of
/// up to 32 KiB: 1.4 MiB.
const TRIM_STEPS: u32 = 512;

#[stream_verdict]
pub fn lb_verdict(ctx: SkBuffContext) -> u32 {
    try_verdict(&ctx)
}

fn try_verdict(ctx: &SkBuffContext) -> u32 {
    let mut len = ctx.len() as u64;
    let stats = match CPU_STATS.get_ptr_mut(0) {
        Some(s) => s,
        None => return SK_PASS,
    };
    // SAFETY (every deref of `stats` and `ctl` below): map values stay valid for the whole run
    // of the program; one socket's verdicts run one at a time, so plain updates of its own
    // fields are not lost, and the per-CPU totals are private to this CPU.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if len == 0 {
        // A bare FIN. Redirecting it (or passing it on while the socket is in the map) makes
        // the peer's psock fail with EPIPE and drop everything queued after it. The daemon
        // still sees EOF through recv() and passes the FIN on itself.
        unsafe { (*stats).empty_drops += 1 };
        debug!(
            ctx,
            "lb: zero-length skb (FIN) on socket cookie {} dropped", cookie
        );
        return SK_DROP;
    }
    let Some(slot) = SLOTS.get_ptr(&cookie).map(|s| unsafe { *s }) else {
        unsafe { (*stats).untracked += 1 };
        return SK_PASS;
    };
    let Some(ctl) = FLOW_CTL.get_ptr_mut(slot) else {
        unsafe { (*stats).untracked += 1 };
        return SK_PASS;
    };
    len = take_new_bytes(ctx, stats, ctl, len);
    if len == 0 {
        // Every byte of it was taken before; trimmed to nothing, so dropping it does not
        // advance the socket's copied_seq.
        return SK_DROP;
    }
    if !within_limit(ctx.skb.skb, ctl, len) {
        // Wholly past the socket's limit: consumed, never forwarded.
        return SK_DROP;
    }
    // The skb's length as it is now (cut at the limit, or not): read again rather than carried
    // out of the branches above, so that the verifier meets one state here, not one per
    // branch (carried, the rest of the program was explored once per way through).
    len = ctx.len() as u64;
    let flags = unsafe { (*ctl).flags };
    // The daemon's fields change under us: read each once.
    let allow = unsafe { core::ptr::read_volatile(&(*ctl).allow) };
    let consumed = unsafe { core::ptr::read_volatile(&(*ctl).consumed) };
    let passed = unsafe { (*ctl).passed };
    if flags & FLAG_REDIRECTING == 0 {
        // Held. Resume only when allowed and caught up: every byte passed so far has been
        // read and forwarded by the daemon, so nothing waits in this socket's queue.
        if allow == 0 || passed != consumed {
            return hold(ctx, stats, ctl, slot, len, passed == consumed, EVENT_HELD);
        }
        let Some(seq) = peer_seq(cookie, &WRITE_SEQ_OFFSET) else {
            unsafe { (*stats).misses += 1 };
            return hold(ctx, stats, ctl, slot, len, true, EVENT_HELD);
        };
        unsafe {
            if flags & FLAG_BASED == 0 {
                // The first redirect: nothing redirected yet, and everything the daemon wrote
                // is in the peer's write_seq already.
                (*ctl).peer_seq_base = seq.wrapping_sub(consumed as u32);
            }
            (*ctl).flags |= FLAG_REDIRECTING | FLAG_BASED;
            (*stats).resumes += 1;
        }
        return redirect(ctx, stats, ctl, slot, cookie, len);
    }
    if allow == 0 {
        unsafe { (*ctl).flags &= !FLAG_REDIRECTING };
        return hold(ctx, stats, ctl, slot, len, true, EVENT_HELD);
    }
    let Some(una) = peer_seq(cookie, &SND_UNA_OFFSET) else {
        unsafe {
            (*ctl).flags &= !FLAG_REDIRECTING;
            (*stats).misses += 1;
        }
        return hold(ctx, stats, ctl, slot, len, true, EVENT_HELD);
    };
    // Bytes given to the peer that its receiver has not acknowledged: redirected bytes still in
    // the peer's psock queue (invisible to socket memory accounting) plus its send queue. This
    // is what lb holds for this direction, the quantity the brake bounds.
    let delivered = una.wrapping_sub(unsafe { (*ctl).peer_seq_base });
    let given = unsafe { (*ctl).redirected }.wrapping_add(consumed) as u32;
    let lag = given.wrapping_sub(delivered) as i32;
    let lag = if lag < 0 { 0 } else { lag as u64 };
    let bound = unsafe { core::ptr::read_volatile(&(*ctl).max_in_flight) } as u64;
    if lag + len > bound {
        unsafe {
            (*ctl).flags &= !FLAG_REDIRECTING;
            (*stats).brakes += 1;
        }
        debug!(
            ctx,
            "lb: socket cookie {} braked, {} bytes in flight", cookie, lag
        );
        return hold(ctx, stats, ctl, slot, len, true, EVENT_BRAKE);
    }
    if lag + len > bound / 2 {
        // Half way to the brake: the daemon shrinks this socket's window, so that a brake, if
        // it comes, holds little. Once per request the daemon has dealt with.
        let done = unsafe { core::ptr::read_volatile(&(*ctl).throttles_done) };
        if unsafe { (*ctl).throttles } == done {
            unsafe { (*ctl).throttles = done.wrapping_add(1) };
            signal(ctx, stats, slot, EVENT_THROTTLE);
        }
    }
    redirect(ctx, stats, ctl, slot, cookie, len)
}

// Inlined: BPF calls take at most five arguments, in registers.
#[inline(always)]
fn redirect(
    ctx: &SkBuffContext,
    stats: *mut CpuStats,
    ctl: *mut SockCtl,
    slot: u32,
    mut cookie: u64,
    len: u64,
) -> u32 {
    if SOCKS.redirect_skb(ctx, &mut cookie, 0) as u32 == SK_PASS {
        unsafe {
            (*ctl).redirected += len;
            (*stats).redirected_bytes += len;
            (*stats).redirected_skbs += 1;
        }
        return SK_PASS;
    }
    // The peer left the map between the lookup and the redirect (its flow is ending).
    unsafe {
        (*ctl).flags &= !FLAG_REDIRECTING;
        (*stats).misses += 1;
    }
    hold(ctx, stats, ctl, slot, len, true, EVENT_HELD)
}

/// Passes the skb to the socket's own queue, where the daemon reads it. `caught_up`: the
/// daemon had forwarded every byte passed before this one, so it may be asleep: wake it.
#[inline(always)]
fn hold(
    ctx: &SkBuffContext,
    stats: *mut CpuStats,
    ctl: *mut SockCtl,
    slot: u32,
    len: u64,
    caught_up: bool,
    kind: u32,
) -> u32 {
    unsafe {
        (*ctl).passed += len;
        (*stats).passed_bytes += len;
        if (*ctl).flags & FLAG_BASED != 0 {
            (*stats).held_bytes += len;
        }
    }
    if caught_up {
        signal(ctx, stats, slot, kind);
    }
    SK_PASS
}

/// Wakes the daemon for the socket in `slot`.
#[inline(always)]
fn signal(ctx: &SkBuffContext, stats: *mut CpuStats, slot: u32, kind: u32) {
    if EVENTS.output::<Event>(Event { slot, kind }, 0).is_err() {
        unsafe { (*stats).events_lost += 1 };
        debug!(ctx, "lb: event ring full, slot {} not signalled", slot);
    }
}

/// Trims the bytes this socket's program already took off the head of the skb and returns the
/// length left.
///
/// The kernel hands the program whole skbs off the receive queue (tcp_read_skb), without the
/// offset tcp_recvmsg applies: when a retransmitted segment partly overlaps bytes TCP had
/// already received, TCP queues it whole, and without this its head would be forwarded a second
/// time (seen as 53 bytes to 256 KiB more at the far end, rarely, under full-speed
/// transfers). The program keeps the sequence number just past the last byte it took in
/// `next_seq`, starting from the socket's `copied_seq` (what the daemon read before insertion).
#[inline(always)]
fn take_new_bytes(ctx: &SkBuffContext, stats: *mut CpuStats, ctl: *mut SockCtl, len: u64) -> u64 {
    let Some(seq) = skb_seq(ctx) else {
        return len;
    };
    // SAFETY: see try_verdict; `next_seq` and `flags` are the program's fields.
    unsafe {
        let next = if (*ctl).flags & FLAG_SEQ != 0 {
            (*ctl).next_seq
        } else {
            let copied = own_seq(ctx, &COPIED_SEQ_OFFSET).unwrap_or(seq);
            debug!(ctx, "lb: first skb: seq {}, copied_seq {}", seq, copied);
            copied
        };
        let overlap = next.wrapping_sub(seq) as i32;
        let end = seq.wrapping_add(len as u32);
        (*ctl).flags |= FLAG_SEQ;
        if overlap <= 0 {
            (*ctl).next_seq = end;
            return len;
        }
        let overlap = (overlap as u64).min(len);
        if overlap < len {
            (*ctl).next_seq = end;
        }
        // bpf_loop: the verifier checks the step once, where a plain loop of this bound
        // multiplied the program's paths past its limit.
        let mut trim = Trim {
            skb: ctx.skb.skb,
            left: overlap,
        };
        bpf_loop(
            TRIM_STEPS,
            trim_step as *mut c_void,
            core::ptr::addr_of_mut!(trim).cast(),
            0,
        );
        let left = trim.left;
        let trimmed = overlap - left;
        debug!(
            ctx,
            "lb: skb seq {} len {}: trimmed {} of {} bytes taken before", seq, len, trimmed, overlap
        );
        (*stats).trimmed_bytes += trimmed;
        if left != 0 {
            (*stats).untrimmed += 1;
        }
        // `len - trimmed`, read from the skb: carried out of the loop, the value differed with
        // each number of steps, and the verifier went through the rest of the program once
        // per number (up to TRIM_STEPS times).
        ctx.len() as u64
    }
}

/// Cuts what the socket sends past its limit ([`SockCtl::limit`]: the end of an HTTP response
/// body lb handed to the kernel, so that a server sending more than its Content-Length
/// reaches no client with the excess): the skb's tail past it is cut off, and an skb wholly
/// past it is left to be dropped. Returns false when none of it is left.
#[inline(always)]
fn within_limit(skb: *mut __sk_buff, ctl: *mut SockCtl, len: u64) -> bool {
    // SAFETY: see try_verdict; `limit` is the daemon's, set before the socket was indexed;
    // `past_limit` is the program's.
    unsafe {
        let limit = core::ptr::read_volatile(&(*ctl).limit);
        if limit == 0 {
            return true;
        }
        let taken = (*ctl).redirected + (*ctl).passed;
        let room = if (*ctl).flags & FLAG_SPENT != 0 {
            0
        } else {
            limit.saturating_sub(taken)
        };
        if len <= room {
            return true;
        }
        let mut dropped = len - room;
        // The helper fails for an skb it cannot make linear or above its size cap (and on
        // kernels without the fix to its minimum length): then the whole skb goes, and the
        // limit is spent, so no later skb can bring bytes past it. The body ends short (its
        // client sees it incomplete), never with an excess.
        let cut = room != 0 && bpf_skb_change_tail(skb, room as u32, 0) == 0;
        if !cut && room != 0 {
            (*ctl).flags |= FLAG_SPENT;
            dropped = len;
        }
        let past = (*ctl).past_limit as u64 + dropped;
        (*ctl).past_limit = if past > u32::MAX as u64 {
            u32::MAX
        } else {
            past as u32
        };
        cut
    }
}

/// The state of a trim: the skb, and how many bytes are still to come off its head.
#[repr(C)]
struct Trim {
    skb: *mut __sk_buff,
    left: u64,
}

/// One step of a trim (a bpf_loop callback): 0 to go on, 1 to stop.
unsafe extern "C" fn trim_step(_index: u32, trim: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the `Trim` on the caller's stack, alive for the whole loop.
    unsafe {
        let trim = trim as *mut Trim;
        let left = (*trim).left;
        if left == 0 {
            return 1;
        }
        let step = if left < TRIM_STEP { left } else { TRIM_STEP };
        if bpf_skb_adjust_room((*trim).skb, -(step as i32), 0, 0) != 0 {
            return 1;
        }
        (*trim).left = left - step;
        0
    }
}

/// TCP's sequence number of the skb's first byte (`TCP_SKB_CB(skb)->seq`), read from the
/// `struct sk_buff` the context stands for.
#[inline(always)]
fn skb_seq(ctx: &SkBuffContext) -> Option<u32> {
    // SAFETY: bpf_probe_read_kernel cannot fault; the offset comes from the kernel's BTF.
    unsafe {
        let offset = core::ptr::read_volatile(&SKB_SEQ_OFFSET) as usize;
        bpf_probe_read_kernel((ctx.skb.skb as *const u8).add(offset) as *const u32).ok()
    }
}

/// A sequence number of this socket's own `struct tcp_sock`, at the byte offset in `offset`.
#[inline(always)]
fn own_seq(ctx: &SkBuffContext, offset: &u32) -> Option<u32> {
    // SAFETY: `sk` of an sk_skb context is the receiving socket (or null); it is not
    // referenced, so nothing to release; the field is read through bpf_probe_read_kernel.
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        tcp_sock_u32(sk.cast(), offset)
    }
}

/// A sequence number of the peer's `struct tcp_sock` (`write_seq`: every byte it was given to
/// send; `snd_una`: the first byte its receiver has not acknowledged), at the byte offset held
/// in `offset`. `None` when the peer is not in the map (not inserted yet, or gone).
#[inline(always)]
fn peer_seq(cookie: u64, offset: &u32) -> Option<u32> {
    let key = cookie;
    // SAFETY: a SOCKHASH lookup from a program returns a referenced socket (or null) that
    // must be released on every path, which the code below does; the field is read through
    // bpf_probe_read_kernel, so a wrong offset cannot fault.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::addr_of!(SOCKS) as *mut c_void,
            core::ptr::addr_of!(key).cast(),
        );
        if sk.is_null() {
            return None;
        }
        let seq = tcp_sock_u32(sk, offset);
        bpf_sk_release(sk);
        seq
    }
}

/// The u32 at byte offset `offset` (a BTF offset global) of socket `sk`'s `struct tcp_sock`;
/// `None` if `sk` is not a TCP socket. Read through bpf_probe_read_kernel, so a wrong offset
/// cannot fault.
#[inline(always)]
unsafe fn tcp_sock_u32(sk: *mut c_void, offset: &u32) -> Option<u32> {
    // SAFETY: `sk` is a socket pointer the verifier accepts for bpf_skc_to_tcp_sock.
    unsafe {
        let tp = bpf_skc_to_tcp_sock(sk);
        if tp.is_null() {
            return None;
        }
        let offset = core::ptr::read_volatile(offset) as usize;
        bpf_probe_read_kernel((tp as *const u8).add(offset) as *const u32).ok()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
