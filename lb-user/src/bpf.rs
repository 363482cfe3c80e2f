//! Loading the kernel half of the forwarding stage and talking to its maps.
//!
//! [`Kernel::load`] loads the embedded eBPF object, attaches the stream verdict program to the
//! SOCKHASH (attach before any socket is inserted), and starts forwarding the program's aya-log
//! records to the daemon's log. The flow code in [`crate::forward::kernel`] uses the map
//! operations below.
use aya::{
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use lb_common::{CpuStats, SockCounters, CPU_STATS_MAP, SOCKS_MAP, SOCK_COUNTERS_MAP, VERDICT_PROG};
use std::{
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicI64, Ordering::Relaxed},
        Mutex, RwLock,
    },
};
use tokio::io::unix::AsyncFd;

/// The embedded eBPF object (empty when lb was built without the eBPF toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Why BPF could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("this lb was built without its eBPF program (the eBPF toolchain was missing at build time; run `cargo xtask setup` and rebuild)")]
    NotBuilt,
    #[error("loading the eBPF object failed (needs root or CAP_BPF + CAP_NET_ADMIN, kernel >= 5.10): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("loading or attaching the verdict program failed: {0}")]
    Program(#[from] aya::programs::ProgramError),
}

/// The loaded program and its maps.
pub struct Kernel {
    socks: Mutex<SockHash<MapData, u64>>,
    // Lookups take `&self`: readers share, inserts and removals are exclusive.
    counters: RwLock<HashMap<MapData, u64, SockCounters>>,
    stats: PerCpuArray<MapData, CpuStats>,
    /// Counters entries lb inserted and has not removed (two per kernel flow): a leak check
    /// that costs no map walk.
    tracked: AtomicI64,
    /// Flows whose sockets are both in the SOCKHASH now.
    flows: AtomicI64,
    // Keeps the program loaded and attached for as long as lb runs.
    _ebpf: Ebpf,
}

impl Kernel {
    /// Loads and attaches the program. Must run inside the tokio runtime (the log reader is a
    /// task).
    pub fn load() -> Result<Kernel, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        raise_memlock_limit();
        // The program's log statements are compiled in at every level; filter them in the
        // kernel at the daemon's level, so a record nobody shows is never written.
        let level = log_level();
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(e) => tracing::warn!("eBPF log messages will not be shown: {e}"),
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).ok_or(BpfError::Missing(name));
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, SOCKS_MAP)?).map_err(|e| BpfError::Map(SOCKS_MAP, e))?;
        let counters: HashMap<MapData, u64, SockCounters> =
            HashMap::try_from(take(&mut ebpf, SOCK_COUNTERS_MAP)?)
                .map_err(|e| BpfError::Map(SOCK_COUNTERS_MAP, e))?;
        let stats: PerCpuArray<MapData, CpuStats> = PerCpuArray::try_from(take(&mut ebpf, CPU_STATS_MAP)?)
            .map_err(|e| BpfError::Map(CPU_STATS_MAP, e))?;
        let prog: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROG)
            .ok_or(BpfError::Missing(VERDICT_PROG))?
            .try_into()?;
        prog.load()?;
        prog.attach(socks.fd())?;
        Ok(Kernel {
            socks: Mutex::new(socks),
            counters: RwLock::new(counters),
            stats,
            tracked: AtomicI64::new(0),
            flows: AtomicI64::new(0),
            _ebpf: ebpf,
        })
    }

    /// Starts tracking a socket's counters (zeroed). Before it enters the SOCKHASH.
    pub fn track(&self, cookie: u64) -> Result<(), aya::maps::MapError> {
        write(&self.counters).insert(cookie, SockCounters::default(), 0)?;
        self.tracked.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Stops tracking a socket's counters (a socket that did not enter the SOCKHASH).
    pub fn untrack(&self, cookie: u64) {
        if write(&self.counters).remove(&cookie).is_ok() {
            self.tracked.fetch_sub(1, Relaxed);
        }
    }

    /// Stores `peer` under `cookie`: from now on, bytes received by the socket with that cookie
    /// are redirected to `peer`. Note that it is `peer` that joins the map (and gets the
    /// verdict program).
    pub fn insert(&self, cookie: u64, peer: impl AsRawFd) -> Result<(), aya::maps::MapError> {
        self.socks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cookie, peer.as_raw_fd(), 0)
    }

    /// Removes a socket's SOCKHASH entry and counters; a missing SOCKHASH entry is not an error
    /// (the kernel drops an entry itself when its socket closes).
    pub fn forget(&self, cookie: u64) {
        let _ = self
            .socks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie);
        self.untrack(cookie);
    }

    /// What the program did so far with the bytes the socket `cookie` received.
    pub fn counters(&self, cookie: u64) -> SockCounters {
        self.counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cookie, 0)
            .unwrap_or_default()
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

    /// Sockets with a counters entry: two per kernel-forwarded flow.
    pub fn tracked_sockets(&self) -> i64 {
        self.tracked.load(Relaxed)
    }

    /// Totals over every CPU.
    pub fn stats(&self) -> CpuStats {
        match self.stats.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().fold(CpuStats::default(), |acc, s| acc.add(s)),
            Err(_) => CpuStats::default(),
        }
    }
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

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
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
