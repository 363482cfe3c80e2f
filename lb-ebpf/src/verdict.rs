//! The stream verdict program (compiled for the BPF target only; see main.rs).
//!
//! Per skb a socket receives, it decides between redirecting the bytes to the socket's peer
//! (the kernel forwards them) and passing them to the socket's own queue (the daemon reads and
//! forwards them: "held"), following the socket's [`SockCtl`]. The protocol is drawn in
//! lb-user/src/LIFECYCLE.md; in short:
//! - held → redirecting only when the daemon allows it and has forwarded every byte passed so
//!   far (`passed == consumed`), so no redirected byte can overtake a held one;
//! - redirecting → held (the brake) when the peer has not yet queued more than `max_in_flight`
//!   of the redirected bytes: the bytes then stay charged to this socket's receive buffer, TCP's
//!   window closes on the sender, and the daemon is woken through the ring buffer.
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    cty::c_void,
    helpers::{
        bpf_get_socket_cookie, bpf_probe_read_kernel,
        generated::{bpf_map_lookup_elem, bpf_sk_release, bpf_skc_to_tcp_sock},
    },
    macros::{map, stream_verdict},
    maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    CpuStats, Event, SockCtl, BPF_F_MMAPABLE, EVENTS_BYTES, EVENT_BRAKE, EVENT_HELD, FLAG_BASED,
    FLAG_REDIRECTING, MAX_SOCKETS,
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

#[stream_verdict]
pub fn lb_verdict(ctx: SkBuffContext) -> u32 {
    try_verdict(&ctx)
}

fn try_verdict(ctx: &SkBuffContext) -> u32 {
    let len = ctx.len() as u64;
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
            (*ctl).flags = FLAG_REDIRECTING | FLAG_BASED;
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
    if caught_up && EVENTS.output::<Event>(Event { slot, kind }, 0).is_err() {
        unsafe { (*stats).events_lost += 1 };
        debug!(ctx, "lb: event ring full, slot {} not signalled", slot);
    }
    SK_PASS
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
        let tp = bpf_skc_to_tcp_sock(sk);
        let offset = core::ptr::read_volatile(offset) as usize;
        let seq = if tp.is_null() {
            None
        } else {
            bpf_probe_read_kernel((tp as *const u8).add(offset) as *const u32).ok()
        };
        bpf_sk_release(sk);
        seq
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
