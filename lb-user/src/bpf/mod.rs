//! Loading the kernel half of the forwarding stage and talking to its maps.
//!
//! [`Kernel::load`] loads the embedded eBPF object (with the running kernel's `tcp_sock` field
//! offsets, [`btf`]), attaches the stream verdict program to the SOCKHASH (attach before any
//! socket is inserted), maps the per-socket control array ([`ctl`]), starts the event reader
//! ([`events`]) and forwards the program's aya-log records to the daemon's log. The flow code in
//! [`crate::forward::kernel`] uses [`Kernel::track`] and the map operations below.
mod btf;
mod ctl;
mod events;
mod watch;

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray, RingBuf, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use lb_common::{
    CpuStats, COPIED_SEQ_OFFSET_GLOBAL, CPU_STATS_MAP, EVENTS_MAP, FLOW_CTL_MAP, SKB_SEQ_OFFSET_GLOBAL,
    SLOTS_MAP, SND_UNA_OFFSET_GLOBAL, SOCKS_MAP, VERDICT_PROG, WRITE_SEQ_OFFSET_GLOBAL,
};
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};
use tokio::io::unix::AsyncFd;

use ctl::CtlArray;
pub use ctl::Slot;
use events::Wakers;
pub use events::{Wake, THROTTLE_RCVBUF};
use watch::Watcher;
pub use watch::{Interest, Watch};

/// The embedded eBPF object (empty when lb was built without the eBPF toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Why BPF could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("this lb was built without its eBPF program (the eBPF toolchain was missing at build time; run `cargo xtask setup` and rebuild)")]
    NotBuilt,
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("loading the eBPF object failed (needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON, kernel >= 5.10): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("mapping the control array into memory failed: {0}")]
    Mmap(std::io::Error),
    #[error("starting the event reader failed: {0}")]
    Events(std::io::Error),
    #[error("loading or attaching the verdict program failed (needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON): {0}")]
    Program(#[from] aya::programs::ProgramError),
}

/// Why a socket could not be tracked (its flow then stays in userspace).
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("all {} control slots are in use", lb_common::MAX_SOCKETS)]
    Full,
    #[error("slot index: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// The loaded program and its maps.
pub struct Kernel {
    socks: Mutex<SockHash<MapData, u64>>,
    slots: Mutex<HashMap<MapData, u64, u32>>,
    ctl: Arc<CtlArray>,
    wakers: Arc<Wakers>,
    /// Ends and errors of every kernel flow's sockets.
    watcher: Watcher,
    stats: Arc<PerCpuArray<MapData, CpuStats>>,
    /// Sockets lb tracks now (two per kernel flow): a leak check that costs no map walk.
    tracked: AtomicI64,
    /// Flows whose sockets are both in the SOCKHASH now.
    flows: AtomicI64,
    /// Flows with a direction braked now.
    braked: AtomicI64,
    /// The most bytes one flow direction had inside lb at once, as the daemon saw them.
    most_in_flight: AtomicU64,
    // Keeps the array map alive as long as its mapping, and the program loaded and attached
    // for as long as lb runs.
    _ctl_map: MapData,
    _ebpf: Ebpf,
}

impl Kernel {
    /// Loads and attaches the program. Must run inside the tokio runtime (the log and event
    /// readers are tasks).
    pub fn load() -> Result<Kernel, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        raise_memlock_limit();
        let offsets = btf::tcp_sock_offsets()?;
        // The program's log statements are compiled in at every level; filter them in the
        // kernel at the daemon's level, so a record nobody shows is never written.
        let level = log_level();
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .override_global(WRITE_SEQ_OFFSET_GLOBAL, &offsets.write_seq, true)
            .override_global(SND_UNA_OFFSET_GLOBAL, &offsets.snd_una, true)
            .override_global(COPIED_SEQ_OFFSET_GLOBAL, &offsets.copied_seq, true)
            .override_global(SKB_SEQ_OFFSET_GLOBAL, &offsets.skb_seq, true)
            .load(OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(e) => tracing::warn!("eBPF log messages will not be shown: {e}"),
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).ok_or(BpfError::Missing(name));
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, SOCKS_MAP)?).map_err(|e| BpfError::Map(SOCKS_MAP, e))?;
        let slots: HashMap<MapData, u64, u32> =
            HashMap::try_from(take(&mut ebpf, SLOTS_MAP)?).map_err(|e| BpfError::Map(SLOTS_MAP, e))?;
        let ctl_map = match take(&mut ebpf, FLOW_CTL_MAP)? {
            Map::Array(data) => data,
            _ => return Err(BpfError::Missing(FLOW_CTL_MAP)),
        };
        let ctl = Arc::new(CtlArray::map(ctl_map.fd().as_fd()).map_err(BpfError::Mmap)?);
        let ring: RingBuf<MapData> =
            RingBuf::try_from(take(&mut ebpf, EVENTS_MAP)?).map_err(|e| BpfError::Map(EVENTS_MAP, e))?;
        let stats: PerCpuArray<MapData, CpuStats> = PerCpuArray::try_from(take(&mut ebpf, CPU_STATS_MAP)?)
            .map_err(|e| BpfError::Map(CPU_STATS_MAP, e))?;
        let stats = Arc::new(stats);
        let wakers = Arc::new(Wakers::default());
        events::spawn_reader(ring, wakers.clone(), stats.clone(), ctl.clone()).map_err(BpfError::Events)?;
        let watcher = Watcher::spawn(wakers.clone()).map_err(BpfError::Events)?;
        let prog: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROG)
            .ok_or(BpfError::Missing(VERDICT_PROG))?
            .try_into()?;
        prog.load()?;
        prog.attach(socks.fd())?;
        // Loading parsed the kernel's BTF twice (aya for relocations, btf-rs for the offsets):
        // tens of MiB of short-lived allocations that the allocator would otherwise keep
        // resident for the daemon's whole life.
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe { libc::malloc_trim(0) };
        Ok(Kernel {
            socks: Mutex::new(socks),
            slots: Mutex::new(slots),
            ctl,
            wakers,
            watcher,
            stats,
            tracked: AtomicI64::new(0),
            flows: AtomicI64::new(0),
            braked: AtomicI64::new(0),
            most_in_flight: AtomicU64::new(0),
            _ctl_map: ctl_map,
            _ebpf: ebpf,
        })
    }

    /// Gives a socket a control slot (redirecting allowed when `redirect`, else every byte is
    /// held for the daemon; braking above `max_in_flight`) and makes it visible to the program.
    /// Before the socket enters the SOCKHASH.
    pub fn track(&self, cookie: u64, max_in_flight: u32, redirect: bool) -> Result<Tracked<'_>, TrackError> {
        let slot = self.ctl.take(max_in_flight, redirect).ok_or(TrackError::Full)?;
        let wake = self.wakers.register(slot.index);
        if let Err(e) = lock(&self.slots).insert(cookie, slot.index, 0) {
            self.wakers.unregister(slot.index);
            return Err(e.into());
        }
        self.tracked.fetch_add(1, Relaxed);
        Ok(Tracked {
            kernel: self,
            cookie,
            slot,
            wake,
        })
    }

    /// Stores `peer` under `cookie`: from now on, bytes received by the socket with that cookie
    /// are redirected to `peer` when its control state allows. Note that it is `peer` that
    /// joins the map (and gets the verdict program).
    pub fn insert(&self, cookie: u64, peer: impl AsRawFd) -> Result<(), aya::maps::MapError> {
        lock(&self.socks).insert(cookie, peer.as_raw_fd(), 0)
    }

    /// Removes a socket's SOCKHASH entry; a missing entry is not an error (the kernel drops an
    /// entry itself when its socket closes).
    pub fn remove(&self, cookie: u64) {
        let _ = lock(&self.socks).remove(&cookie);
    }

    pub fn flow_started(&self) {
        self.flows.fetch_add(1, Relaxed);
    }

    pub fn flow_ended(&self) {
        self.flows.fetch_sub(1, Relaxed);
    }

    /// Kernel-forwarded flows now.
    pub fn flows(&self) -> i64 {
        self.flows.load(Relaxed)
    }

    /// A flow's braked directions went from none to some (`true`) or back (`false`).
    pub fn set_braked(&self, braked: bool) {
        self.braked.fetch_add(if braked { 1 } else { -1 }, Relaxed);
    }

    /// Flows with at least one braked direction now.
    pub fn braked_flows(&self) -> i64 {
        self.braked.load(Relaxed)
    }

    /// Notes that a flow direction had `bytes` inside lb (see [`Kernel::most_in_flight`]).
    pub fn note_in_flight(&self, bytes: u64) {
        self.most_in_flight.fetch_max(bytes, Relaxed);
    }

    /// The most bytes one flow direction had inside lb at once since lb started: not yet
    /// acknowledged by its receiver plus held on its sender's socket, as the daemon saw them
    /// when the program woke it (brakes, throttles). A direction that never woke it stayed
    /// under half of `max_in_flight` (the throttle's threshold).
    pub fn most_in_flight(&self) -> u64 {
        self.most_in_flight.load(Relaxed)
    }

    /// Sockets lb tracks now: two per kernel-forwarded flow.
    pub fn tracked_sockets(&self) -> i64 {
        self.tracked.load(Relaxed)
    }

    /// Totals over every CPU.
    pub fn stats(&self) -> CpuStats {
        sum_stats(&self.stats)
    }
}

/// One socket lb forwards in the kernel: its control slot and its wake-up. Dropping it takes
/// the socket out of the program's view (SLOTS) before the slot is reused.
pub struct Tracked<'k> {
    kernel: &'k Kernel,
    pub cookie: u64,
    slot: Slot<'k>,
    wake: Arc<Wake>,
}

impl<'k> Tracked<'k> {
    /// The socket's control state.
    pub fn ctl(&self) -> &Slot<'k> {
        &self.slot
    }

    /// Watches the socket for end of stream and errors; its waits also end when the program
    /// signals this socket (a brake, or bytes held while the daemon had caught up).
    pub fn watch(&self, sock: &std::net::TcpStream) -> std::io::Result<Watch<'k>> {
        Watch::add(&self.kernel.watcher, sock, self.slot.index, self.wake.clone())
    }

    /// The socket's wake-up, which also keeps its throttle state (see [`Wake`]).
    pub fn wake(&self) -> &Wake {
        &self.wake
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let _ = lock(&self.kernel.slots).remove(&self.cookie);
        self.kernel.wakers.unregister(self.slot.index);
        self.kernel.tracked.fetch_sub(1, Relaxed);
    }
}

/// Folds the per-CPU totals into one.
fn sum_stats(stats: &PerCpuArray<MapData, CpuStats>) -> CpuStats {
    match stats.get(&0, 0) {
        Ok(per_cpu) => per_cpu.iter().fold(CpuStats::default(), |acc, s| acc.add(s)),
        Err(_) => CpuStats::default(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The most verbose level the daemon's log shows, as aya-log's level number
/// (0 off, 1 error … 5 trace).
fn log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless on newer ones).
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Forwards the program's aya-log records (a ring buffer) to the `log` crate, which
/// tracing-subscriber shows with the daemon's own messages.
fn spawn_log_reader<T: log::Log + Send + 'static>(logger: aya_log::EbpfLogger<T>) {
    // SAFETY: the logger owns its ring buffer fd, which stays open until the AsyncFd drops it.
    let fd = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("eBPF log messages will not be shown: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        let mut fd = fd;
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
