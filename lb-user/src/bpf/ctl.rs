//! The daemon's side of the per-socket control state ([`SockCtl`], one slot of the `FLOW_CTL`
//! array per tracked socket).
//!
//! The array is mapped into the daemon's memory (`BPF_F_MMAPABLE`), so reading what the program
//! counted and publishing what the daemon did are plain memory accesses, not syscalls. Each
//! field has one writer (see [`SockCtl`]); the daemon reads the program's fields and writes its
//! own with single aligned atomic accesses.
use lb_common::{SockCtl, MAX_SOCKETS};
use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::{addr_of_mut, NonNull},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release},
        Mutex,
    },
};

/// The mapped control array.
pub struct CtlArray {
    base: NonNull<SockCtl>,
    bytes: usize,
    /// Free slots, oldest freed first: a slot is reused as late as possible, so a verdict that
    /// looked its socket up just before the socket left can only touch a slot nobody uses.
    free: Mutex<SlotPool>,
}

struct SlotPool {
    /// Slots never handed out start here.
    next: u32,
    freed: VecDeque<u32>,
}

// SAFETY: the mapping is shared memory accessed only through atomics (see `Slot`).
unsafe impl Send for CtlArray {}
unsafe impl Sync for CtlArray {}

impl CtlArray {
    /// Maps the `FLOW_CTL` array of the map behind `fd`.
    pub fn map(fd: BorrowedFd<'_>) -> io::Result<CtlArray> {
        let bytes = std::mem::size_of::<SockCtl>() * MAX_SOCKETS as usize;
        // SAFETY: a shared read-write mapping of a BPF array map created with BPF_F_MMAPABLE;
        // the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(CtlArray {
            base: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            bytes,
            free: Mutex::new(SlotPool {
                next: 0,
                freed: VecDeque::new(),
            }),
        })
    }

    /// Takes a free slot and initialises it for a socket the program cannot see yet;
    /// `redirect`: whether the program may redirect its bytes (else it holds them all).
    pub fn take(&self, max_in_flight: u32, redirect: bool) -> Option<Slot<'_>> {
        let index = {
            let mut pool = self.free.lock().unwrap_or_else(|p| p.into_inner());
            match pool.freed.pop_front() {
                Some(i) => i,
                None if pool.next < MAX_SOCKETS => {
                    pool.next += 1;
                    pool.next - 1
                }
                None => return None,
            }
        };
        let slot = Slot { array: self, index };
        // SAFETY: index < MAX_SOCKETS, inside the mapping; no program reads a slot whose socket
        // is not indexed in SLOTS yet, so this plain initialisation races with nobody.
        unsafe {
            slot.ptr().write(SockCtl {
                allow: u32::from(redirect),
                max_in_flight,
                ..SockCtl::default()
            })
        };
        Some(slot)
    }

    /// Slot `index` again, which [`Slot::keep`] kept out of the pool (a flow that did not
    /// move after all): its state is as the program left it.
    pub fn reclaim(&self, index: u32) -> Slot<'_> {
        Slot { array: self, index }
    }

    /// Marks the slots of flows moved in from another process (an upgrade) as in use: the pool
    /// hands out every other one.
    pub fn adopt_used(&self, used: &[u32]) {
        let mut used: Vec<u32> = used.iter().copied().filter(|&i| i < MAX_SOCKETS).collect();
        used.sort_unstable();
        let next = used.last().map_or(0, |&i| i + 1);
        let mut pool = self.free.lock().unwrap_or_else(|p| p.into_inner());
        pool.freed = (0..next).filter(|i| used.binary_search(i).is_err()).collect();
        pool.next = next;
    }

    /// The slot of index `index` for a moved-in flow (marked in use by [`Self::adopt_used`]).
    pub fn adopted(&self, index: u32) -> Option<Slot<'_>> {
        (index < MAX_SOCKETS).then_some(Slot { array: self, index })
    }

    /// Whether the socket in slot `index` has a throttle request the daemon has not dealt
    /// with (for the event reader, which knows slots by index only; a slot it finds
    /// registered is in use).
    pub fn throttle_open(&self, index: u32) -> bool {
        if index >= MAX_SOCKETS {
            return false;
        }
        // SAFETY: index < MAX_SOCKETS, inside the mapping; both are aligned u32 fields, read
        // atomically as in `Slot`.
        unsafe {
            let p = self.base.as_ptr().add(index as usize);
            let asked = AtomicU32::from_ptr(addr_of_mut!((*p).throttles)).load(Acquire);
            let done = AtomicU32::from_ptr(addr_of_mut!((*p).throttles_done)).load(Acquire);
            asked != done
        }
    }

    fn give_back(&self, index: u32) {
        let mut pool = self.free.lock().unwrap_or_else(|p| p.into_inner());
        pool.freed.push_back(index);
    }
}

impl CtlArray {
    /// Bytes the program redirected from the socket of slot `index`. Meaningful for a slot in
    /// use only (a freed one may count another socket's bytes already): a reader that holds no
    /// [`Slot`] must know the slot's socket is still tracked ([`super::live`]).
    pub fn redirected(&self, index: u32) -> u64 {
        assert!(index < MAX_SOCKETS, "slot {index} is past the array");
        // SAFETY: index < MAX_SOCKETS, so the element is inside the mapping, which lives as
        // long as `self`; `redirected` is an aligned u64 the program writes with single 8-byte
        // stores.
        unsafe {
            let field = addr_of_mut!((*self.base.as_ptr().add(index as usize)).redirected);
            AtomicU64::from_ptr(field).load(Acquire)
        }
    }
}

impl Drop for CtlArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// One socket's slot. Returned to the pool when dropped (after the socket left the SLOTS
/// index, see [`super::Tracked`]).
pub struct Slot<'a> {
    array: &'a CtlArray,
    pub index: u32,
}

impl Slot<'_> {
    fn ptr(&self) -> *mut SockCtl {
        // SAFETY: index < MAX_SOCKETS, so the element is inside the mapping.
        unsafe { self.array.base.as_ptr().add(self.index as usize) }
    }

    fn u64_field(&self, field: fn(*mut SockCtl) -> *mut u64) -> &AtomicU64 {
        // SAFETY: the field is an aligned u64 inside the mapping, which outlives `self`; the
        // program writes it with single 8-byte stores.
        unsafe { AtomicU64::from_ptr(field(self.ptr())) }
    }

    fn u32_field(&self, field: fn(*mut SockCtl) -> *mut u32) -> &AtomicU32 {
        // SAFETY: as above, for an aligned u32.
        unsafe { AtomicU32::from_ptr(field(self.ptr())) }
    }

    /// Bytes the program redirected to the peer.
    pub fn redirected(&self) -> u64 {
        self.array.redirected(self.index)
    }

    /// Bytes the program passed to the socket's own queue.
    pub fn passed(&self) -> u64 {
        self.u64_field(|p| unsafe { addr_of_mut!((*p).passed) })
            .load(Acquire)
    }

    /// Bytes of `passed` the daemon has forwarded.
    pub fn consumed(&self) -> u64 {
        self.u64_field(|p| unsafe { addr_of_mut!((*p).consumed) })
            .load(Relaxed)
    }

    /// Publishes that the daemon forwarded `passed` bytes up to `total`: the program may
    /// resume redirecting once it has passed no more than that. Called only after the bytes
    /// are in the peer's send queue (Release: the program must not see the count earlier).
    pub fn set_consumed(&self, total: u64) {
        self.u64_field(|p| unsafe { addr_of_mut!((*p).consumed) })
            .store(total, Release)
    }

    /// Lets the program redirect this socket's bytes (once it has passed no more than
    /// `consumed`). Release: whatever the daemon wrote to the peer before must be queued
    /// before the program can see the permission.
    pub fn allow_redirect(&self) {
        self.u32_field(|p| unsafe { addr_of_mut!((*p).allow) })
            .store(1, Release)
    }

    /// Throttle requests the program made (see [`SockCtl::throttles`]).
    pub fn throttles(&self) -> u32 {
        self.u32_field(|p| unsafe { addr_of_mut!((*p).throttles) })
            .load(Acquire)
    }

    /// Throttle requests the daemon has dealt with.
    pub fn throttles_done(&self) -> u32 {
        self.u32_field(|p| unsafe { addr_of_mut!((*p).throttles_done) })
            .load(Relaxed)
    }

    /// Publishes that the daemon dealt with the throttle requests up to `n`: the program may
    /// ask again.
    pub fn set_throttles_done(&self, n: u32) {
        self.u32_field(|p| unsafe { addr_of_mut!((*p).throttles_done) })
            .store(n, Release)
    }

    /// Bounds the bytes the program takes from the socket ([`SockCtl::limit`]); before the
    /// socket enters the SOCKHASH.
    pub fn set_limit(&self, limit: u64) {
        self.u64_field(|p| unsafe { addr_of_mut!((*p).limit) })
            .store(limit, Release)
    }

    /// Bytes the socket sent past its limit, which the program dropped.
    pub fn past_limit(&self) -> u32 {
        self.u32_field(|p| unsafe { addr_of_mut!((*p).past_limit) })
            .load(Acquire)
    }

    /// The brake bound this slot was set up with.
    pub fn max_in_flight(&self) -> u32 {
        self.u32_field(|p| unsafe { addr_of_mut!((*p).max_in_flight) })
            .load(Relaxed)
    }
}

impl Slot<'_> {
    /// Keeps the slot out of the pool (its socket's flow moves to another process, which
    /// takes the slot over); its index.
    pub fn keep(self) -> u32 {
        let index = self.index;
        std::mem::forget(self);
        index
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.array.give_back(self.index);
    }
}
