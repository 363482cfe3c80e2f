//! The stream verdict program (compiled for the BPF target only; see main.rs).
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use lb_common::{CpuStats, SockCounters, MAX_SOCKETS};

#[map(name = "SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "SOCK_COUNTERS")]
static SOCK_COUNTERS: HashMap<u64, SockCounters> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "CPU_STATS")]
static CPU_STATS: PerCpuArray<CpuStats> = PerCpuArray::with_max_entries(1, 0);

#[stream_verdict]
pub fn lb_verdict(ctx: SkBuffContext) -> u32 {
    try_verdict(&ctx)
}

fn try_verdict(ctx: &SkBuffContext) -> u32 {
    let len = ctx.len() as u64;
    let stats = CPU_STATS.get_ptr_mut(0);
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if len == 0 {
        // A bare FIN. Redirecting it (or passing it on while the socket is in the map) makes
        // the peer's psock fail with EPIPE and drop everything queued after it. The daemon
        // still sees EOF through recv() and passes the FIN on itself.
        if let Some(s) = stats {
            unsafe { (*s).empty_drops += 1 };
        }
        debug!(
            ctx,
            "lb: zero-length skb (FIN) on socket cookie {} dropped", cookie
        );
        return SK_DROP;
    }
    // One socket's verdicts run one at a time, so plain `+=` on its own entry is safe; the
    // per-CPU totals are private to this CPU.
    let counters = SOCK_COUNTERS.get_ptr_mut(&cookie);
    if let Some(c) = counters {
        if unsafe { (*c).passed_bytes } > 0 {
            // This socket's bytes missed the map before: they are copied by the daemon now,
            // and redirecting later bytes past them would reorder the stream.
            unsafe { (*c).passed_bytes += len };
            if let Some(s) = stats {
                unsafe { (*s).passed_bytes += len };
            }
            return SK_PASS;
        }
    }
    if SOCKS.redirect_skb(ctx, &mut cookie, 0) as u32 == SK_PASS {
        match counters {
            Some(c) => unsafe { (*c).redirected_bytes += len },
            None => {
                if let Some(s) = stats {
                    unsafe { (*s).untracked += 1 };
                }
            }
        }
        if let Some(s) = stats {
            unsafe {
                (*s).redirected_bytes += len;
                (*s).redirected_skbs += 1;
            }
        }
        return SK_PASS;
    }
    // No peer in the map (its entry is not inserted yet, or already gone): keep the bytes on
    // this socket, where the daemon reads and forwards them itself, and keep doing so.
    if let Some(c) = counters {
        unsafe { (*c).passed_bytes += len };
    }
    if let Some(s) = stats {
        unsafe {
            (*s).misses += 1;
            (*s).passed_bytes += len;
        }
    }
    debug!(
        ctx,
        "lb: no peer for socket cookie {}, {} bytes passed", cookie, len
    );
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
