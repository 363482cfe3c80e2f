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
mod live;
mod watch;

use aya::{
    maps::{HashMap, IterableMap, Map, MapData, PerCpuArray, RingBuf, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use lb_common::{
    CpuStats, COPIED_SEQ_OFFSET_GLOBAL, CPU_STATS_MAP, EVENTS_MAP, FLOW_CTL_MAP, SKB_SEQ_OFFSET_GLOBAL,
    SLOTS_MAP, SND_UNA_OFFSET_GLOBAL, SOCKS_MAP, VERDICT_PROG, WRITE_SEQ_OFFSET_GLOBAL,
};
use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, RawFd},
    sync::{
        atomic::{
            AtomicBool, AtomicI64, AtomicU64,
            Ordering::{Relaxed, SeqCst},
        },
        Arc, Mutex,
    },
};
use tokio::io::unix::AsyncFd;

use ctl::CtlArray;
pub use ctl::Slot;
use events::Wakers;
pub use events::{Wake, THROTTLE_RCVBUF};
pub use live::LiveCount;
use watch::Watcher;
pub use watch::{Interest, Watch};

/// The embedded eBPF object (empty when lb was built without the eBPF toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The embedded program and its maps' layout, as a string two binaries can compare (see
/// `crate::upgrade::abi`).
pub fn abi() -> String {
    format!(
        "{:016x}-{}-{}-{}",
        xxhash_rust::xxh3::xxh3_64(OBJECT),
        std::mem::size_of::<lb_common::SockCtl>(),
        lb_common::MAX_SOCKETS,
        lb_common::EVENTS_BYTES
    )
}

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
    #[error("an upgrade is moving the kernel flows to a new process")]
    Moving,
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
    /// Flows stopped for a move since the start.
    moved: AtomicU64,
    /// Moved flows on their way to a session of this process ([`Kernel::resuming`]).
    resuming: AtomicI64,
    /// The most bytes one flow direction had inside lb at once, as the daemon saw them.
    most_in_flight: AtomicU64,
    /// The live flows whose kernel bytes are counted as they go ([`live`]).
    live: live::LiveFlows,
    /// Pauses the reader of the program's log records (`true`) while an upgrade's new process
    /// reads them: one reader at a time, or each would log them and move the other's place.
    log: Option<tokio::sync::watch::Sender<bool>>,
    /// The program's event reader, while it runs ([`Kernel::pause_events`]).
    reader: Mutex<Option<events::Reader>>,
    /// The ring buffer while no reader runs.
    paused: Mutex<Option<RingBuf<MapData>>>,
    /// An upgrade is moving the flows to another process: no new flow takes a slot.
    closed: AtomicBool,
    /// The maps' descriptors, for an upgrade's new process.
    fds: MapFds,
    // Keeps the array map alive as long as its mapping, and (when loaded here) the program
    // loaded and attached for as long as lb runs. A process that took the maps over from
    // another keeps the program through the SOCKHASH, to which it is attached.
    _ctl_map: MapData,
    /// Dropping it would detach the program from the SOCKHASH (aya detaches the links it
    /// tracks): after an upgrade it is leaked instead ([`Kernel::leave_program_attached`]).
    ebpf: Mutex<Option<Ebpf>>,
}

/// The descriptors of the program's maps (the program stays attached to the SOCKHASH).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct MapFds {
    pub socks: RawFd,
    pub slots: RawFd,
    pub ctl: RawFd,
    pub events: RawFd,
    pub stats: RawFd,
}

impl MapFds {
    pub fn all(&self) -> [RawFd; 5] {
        [self.socks, self.slots, self.ctl, self.events, self.stats]
    }
}

/// A socket's part of the kernel path, out of this process's view (its flow moves to another
/// process, or is about to come back): what takes it over needs these.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Detached {
    pub cookie: u64,
    pub slot: u32,
    /// The throttle state of its receive buffer ([`Wake::throttle_state`]).
    pub throttle: (Option<u32>, bool),
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
        let log = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(e) => {
                tracing::warn!("eBPF log messages will not be shown: {e}");
                None
            }
        };
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
        Kernel::with(socks, slots, ctl_map, ctl, ring, stats, log, Some(ebpf))
    }

    /// Takes over the maps (and through the SOCKHASH the attached program) another lb
    /// process handed over in an upgrade, descriptors `fds` of this process; `used`: the
    /// control slots of the flows that move in with them.
    pub fn adopt(fds: MapFds, used: &[u32]) -> Result<Kernel, BpfError> {
        let data = |fd: RawFd, name: &'static str| {
            // SAFETY: a descriptor the old process left open for us and named as this map.
            let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            MapData::from_fd(owned).map_err(|e| BpfError::Map(name, e))
        };
        let socks = data(fds.socks, SOCKS_MAP)?;
        let log = adopt_log(&socks);
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(Map::SockHash(socks)).map_err(|e| BpfError::Map(SOCKS_MAP, e))?;
        let slots: HashMap<MapData, u64, u32> = HashMap::try_from(Map::HashMap(data(fds.slots, SLOTS_MAP)?))
            .map_err(|e| BpfError::Map(SLOTS_MAP, e))?;
        let ctl_map = data(fds.ctl, FLOW_CTL_MAP)?;
        let ctl = Arc::new(CtlArray::map(ctl_map.fd().as_fd()).map_err(BpfError::Mmap)?);
        ctl.adopt_used(used);
        let ring: RingBuf<MapData> = RingBuf::try_from(Map::RingBuf(data(fds.events, EVENTS_MAP)?))
            .map_err(|e| BpfError::Map(EVENTS_MAP, e))?;
        let stats: PerCpuArray<MapData, CpuStats> =
            PerCpuArray::try_from(Map::PerCpuArray(data(fds.stats, CPU_STATS_MAP)?))
                .map_err(|e| BpfError::Map(CPU_STATS_MAP, e))?;
        Kernel::with(socks, slots, ctl_map, ctl, ring, stats, log, None)
    }

    // The maps of a loaded or an adopted program, each typed, and the log reader's switch: a
    // struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn with(
        socks: SockHash<MapData, u64>,
        slots: HashMap<MapData, u64, u32>,
        ctl_map: MapData,
        ctl: Arc<CtlArray>,
        ring: RingBuf<MapData>,
        stats: PerCpuArray<MapData, CpuStats>,
        log: Option<tokio::sync::watch::Sender<bool>>,
        ebpf: Option<Ebpf>,
    ) -> Result<Kernel, BpfError> {
        let fds = MapFds {
            socks: socks.fd().as_fd().as_raw_fd(),
            slots: slots.map().fd().as_fd().as_raw_fd(),
            ctl: ctl_map.fd().as_fd().as_raw_fd(),
            events: ring.as_raw_fd(),
            stats: stats.map().fd().as_fd().as_raw_fd(),
        };
        let stats = Arc::new(stats);
        let wakers = Arc::new(Wakers::default());
        let reader = events::spawn_reader(ring, wakers.clone(), stats.clone(), ctl.clone())
            .map_err(BpfError::Events)?;
        let watcher = Watcher::spawn(wakers.clone()).map_err(BpfError::Events)?;
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
            moved: AtomicU64::new(0),
            resuming: AtomicI64::new(0),
            most_in_flight: AtomicU64::new(0),
            live: Default::default(),
            log,
            reader: Mutex::new(Some(reader)),
            paused: Mutex::new(None),
            closed: AtomicBool::new(false),
            fds,
            _ctl_map: ctl_map,
            ebpf: Mutex::new(ebpf),
        })
    }

    /// An upgrade's new process forwards with the program now: it stays attached to the
    /// SOCKHASH when this process exits (aya would detach it when its object drops).
    pub fn leave_program_attached(&self) {
        if let Some(ebpf) = lock(&self.ebpf).take() {
            std::mem::forget(ebpf);
        }
    }

    /// The maps' descriptors (for an upgrade's new process).
    pub fn map_fds(&self) -> MapFds {
        self.fds
    }

    /// No new flow takes a slot (they stay in userspace) while an upgrade moves the flows;
    /// `false` opens again (the upgrade failed).
    pub fn close_to_new_flows(&self, closed: bool) {
        self.closed.store(closed, SeqCst);
    }

    /// Stops reading the program's events (the new process of an upgrade reads them from
    /// now on; events meanwhile wait in the ring buffer).
    pub async fn pause_events(&self) {
        if let Some(log) = &self.log {
            log.send_replace(true);
        }
        let reader = lock(&self.reader).take();
        if let Some(reader) = reader {
            *lock(&self.paused) = reader.stop().await;
        }
    }

    /// Reads the program's events again (an upgrade that failed).
    pub fn resume_events(&self) -> std::io::Result<()> {
        if let Some(log) = &self.log {
            log.send_replace(false);
        }
        let Some(ring) = lock(&self.paused).take() else {
            return Ok(());
        };
        let reader = events::spawn_reader(ring, self.wakers.clone(), self.stats.clone(), self.ctl.clone())?;
        *lock(&self.reader) = Some(reader);
        Ok(())
    }

    /// A socket that keeps its slot and its SLOTS entry (a flow moved in, or one that did not
    /// move after all): tracked by this process from now on.
    pub fn retrack(&self, detached: Detached, adopted: bool) -> Result<Tracked<'_>, TrackError> {
        let slot = if adopted {
            self.ctl.adopted(detached.slot).ok_or(TrackError::Full)?
        } else {
            self.ctl.reclaim(detached.slot)
        };
        let wake = self.wakers.register(slot.index);
        wake.restore_throttle(detached.throttle);
        self.tracked.fetch_add(1, SeqCst);
        Ok(Tracked {
            kernel: self,
            cookie: detached.cookie,
            slot: Some(slot),
            wake,
        })
    }

    /// Gives a socket a control slot (redirecting allowed when `redirect`, else every byte is
    /// held for the daemon; braking above `max_in_flight`) and makes it visible to the program.
    /// Before the socket enters the SOCKHASH.
    pub fn track(&self, cookie: u64, max_in_flight: u32, redirect: bool) -> Result<Tracked<'_>, TrackError> {
        // Counted before the check, and the move closes before it counts (both SeqCst): a
        // move either sees this socket or this call sees the move.
        self.tracked.fetch_add(1, SeqCst);
        let untrack = |e| {
            self.tracked.fetch_sub(1, SeqCst);
            Err(e)
        };
        if self.closed.load(SeqCst) {
            return untrack(TrackError::Moving);
        }
        let Some(slot) = self.ctl.take(max_in_flight, redirect) else {
            return untrack(TrackError::Full);
        };
        let wake = self.wakers.register(slot.index);
        if let Err(e) = lock(&self.slots).insert(cookie, slot.index, 0) {
            self.wakers.unregister(slot.index);
            return untrack(e.into());
        }
        Ok(Tracked {
            kernel: self,
            cookie,
            slot: Some(slot),
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

    /// A flow stopped for a move (counted before its sockets are untracked, so that whoever
    /// sees no socket tracked also sees every stop counted).
    pub fn flow_moved(&self) {
        self.moved.fetch_add(1, SeqCst);
    }

    /// Flows stopped for a move since lb started.
    pub fn moved_flows(&self) -> u64 {
        self.moved.load(SeqCst)
    }

    /// Moved flows handed to sessions that have not tracked their sockets yet.
    pub fn resuming(&self) -> i64 {
        self.resuming.load(SeqCst)
    }

    /// A moved flow is handed to a session (before it is spawned).
    pub fn resume_started(&self) {
        self.resuming.fetch_add(1, SeqCst);
    }

    /// That session tracks the flow's sockets now (or gave up on it).
    pub fn resume_done(&self) {
        self.resuming.fetch_sub(1, SeqCst);
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

    /// Sockets lb tracks now: two per kernel-forwarded flow (and those of a flow setting up).
    pub fn tracked_sockets(&self) -> i64 {
        self.tracked.load(SeqCst)
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
    /// `None` once detached.
    slot: Option<Slot<'k>>,
    wake: Arc<Wake>,
}

impl<'k> Tracked<'k> {
    /// The socket's control state.
    pub fn ctl(&self) -> &Slot<'k> {
        self.slot
            .as_ref()
            .expect("a tracked socket has its slot until it is detached")
    }

    /// Watches the socket for end of stream and errors; its waits also end when the program
    /// signals this socket (a brake, or bytes held while the daemon had caught up).
    pub fn watch(&self, sock: &std::net::TcpStream) -> std::io::Result<Watch<'k>> {
        Watch::add(&self.kernel.watcher, sock, self.ctl().index, self.wake.clone())
    }

    /// Leaves the socket in the maps, its slot and SLOTS entry kept, for another process (or a
    /// later [`Kernel::retrack`]); this process stops hearing of it.
    pub fn detach(mut self) -> Detached {
        let slot = self.slot.take().expect("detached once");
        Detached {
            cookie: self.cookie,
            throttle: self.wake.throttle_state(),
            slot: slot.keep(),
        }
    }

    /// The socket's wake-up, which also keeps its throttle state (see [`Wake`]).
    pub fn wake(&self) -> &Wake {
        &self.wake
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        // A detached socket's entry and slot stay for whoever takes it over.
        if let Some(slot) = &self.slot {
            let _ = lock(&self.kernel.slots).remove(&self.cookie);
            self.kernel.wakers.unregister(slot.index);
        }
        self.kernel.tracked.fetch_sub(1, SeqCst);
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

/// Reads the log records of the program an upgrade handed over: the loaded `lb_verdict` that
/// uses `socks` (the old process's Ebpf object, which knew its log map, stays behind). Listing
/// loaded programs and opening one's map by id takes CAP_SYS_ADMIN, which the systemd unit
/// does not grant: there the records are not shown after an upgrade, and the log says so.
fn adopt_log(socks: &MapData) -> Option<tokio::sync::watch::Sender<bool>> {
    let found = socks.info().map_err(|e| e.to_string()).and_then(|map| {
        for p in aya::programs::loaded_programs() {
            let p = p.map_err(|e| format!("cannot list the loaded programs (CAP_SYS_ADMIN?): {e}"))?;
            let uses = p
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&map.id()));
            if p.name_as_str() == Some(VERDICT_PROG) && uses {
                return Ok(p.id());
            }
        }
        Err("the handed-over program was not found".to_string())
    });
    let why = match found.map(|id| aya_log::EbpfLogger::init_from_id(id).map_err(|e| e.to_string())) {
        Ok(Ok(logger)) => return spawn_log_reader(logger),
        Ok(Err(e)) | Err(e) => e,
    };
    tracing::warn!("eBPF log messages will not be shown after this upgrade: {why}");
    None
}

/// Forwards the program's aya-log records (a ring buffer) to the `log` crate, which
/// tracing-subscriber shows with the daemon's own messages.
/// Returns the reader's pause switch.
fn spawn_log_reader<T: log::Log + Send + 'static>(
    logger: aya_log::EbpfLogger<T>,
) -> Option<tokio::sync::watch::Sender<bool>> {
    // SAFETY: the logger owns its ring buffer fd, which stays open until the AsyncFd drops it.
    let fd = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("eBPF log messages will not be shown: {e}");
            return None;
        }
    };
    let (pause, mut paused) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut fd = fd;
        loop {
            if *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                ready = fd.readable_mut() => {
                    let Ok(mut guard) = ready else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                changed = paused.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Some(pause)
}
