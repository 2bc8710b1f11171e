//! User space's side of the in-place tables (`clb_common::slots`: the half-open and
//! pending-persistence tables). The map is mapped into this process's memory
//! (`BPF_F_MMAPABLE`) and its slots are read and written with the datapath's own sequence-lock
//! protocol — the same code, from `clb_common::slots` — so the sweeper, resizes and tests
//! never tear an entry the datapath is writing, nor the other way round.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::MapData;
use clb_common::slots::{self, Entry, Mem, Put, SLOT_WAYS, Slot};

/// Times a user-space insert retries a set the datapath holds at that instant.
const PUT_TRIES: u32 = 1000;

/// Maps `len` bytes (rounded up to whole pages) of the mmapable map behind `map` into this
/// process, shared with the kernel; returns the mapping and its size (for `munmap`).
pub fn map_shared(map: &MapData, len: usize) -> io::Result<(*mut u8, usize)> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let bytes = len.next_multiple_of(page);
    // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the size and that
    // the map is mmapable.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            map.fd().as_fd().as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok((p.cast(), bytes))
}

/// One in-place table, mapped.
pub struct SlotTable<S: Slot> {
    map: MapData,
    base: *mut S,
    /// Sets of [`SLOT_WAYS`] slots: the map's `max_entries`.
    sets: u32,
    bytes: usize,
}

// SAFETY: the mapping is memory shared with the kernel, only ever accessed through the
// atomic protocol of `clb_common::slots`; the handle owns it.
unsafe impl<S: Slot> Send for SlotTable<S> {}
// SAFETY: as above.
unsafe impl<S: Slot> Sync for SlotTable<S> {}

impl<S: Slot> SlotTable<S> {
    /// Maps the table behind `map` (an array of sets of [`SLOT_WAYS`] `S`, created
    /// `BPF_F_MMAPABLE`).
    pub fn new(map: MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        let set = SLOT_WAYS as usize * size_of::<S>();
        if info.value_size() as usize != set {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "in-place table has {}-byte sets, this clb's are {set} bytes",
                    info.value_size()
                ),
            ));
        }
        let sets = info.max_entries();
        let (p, bytes) = map_shared(&map, sets as usize * set)?;
        Ok(Self {
            map,
            base: p.cast(),
            sets,
            bytes,
        })
    }

    /// Maps the table behind `map` through a handle of its own (by map id).
    pub fn of(map: &MapData) -> io::Result<Self> {
        let id = map.info().map_err(io::Error::other)?.id();
        Self::new(MapData::from_id(id).map_err(io::Error::other)?)
    }

    /// The map handle (memory accounting, ids).
    pub fn map(&self) -> &MapData {
        &self.map
    }

    /// Slots the table has.
    pub fn capacity(&self) -> u32 {
        self.sets * SLOT_WAYS
    }

    /// Walks every non-empty slot, `batch` slots at a time: `f(keys, values, handles)` of the
    /// batch's non-empty slots; stops when `f` returns false.
    pub fn walk(&self, batch: usize, mut f: impl FnMut(&[S::Key], &[S::Val], &[Entry<S>]) -> bool) {
        let used = self.capacity();
        let (mut keys, mut vals, mut handles) = (Vec::new(), Vec::new(), Vec::new());
        let mut i = 0;
        while i < used {
            keys.clear();
            vals.clear();
            handles.clear();
            let end = used.min(i.saturating_add(batch.max(1) as u32));
            for idx in i..end {
                let Some(s) = slots::slot(self, idx) else {
                    break;
                };
                // SAFETY: a slot of the mapping.
                if let Some((seq, k, v)) = unsafe { slots::snapshot::<Self>(s) }
                    && S::last_seen(&v) != 0
                {
                    keys.push(k);
                    vals.push(v);
                    handles.push(Entry { slot: s, seq });
                }
            }
            if !keys.is_empty() && !f(&keys, &vals, &handles) {
                return;
            }
            i = end;
        }
    }

    /// The entry of `k`.
    pub fn get(&self, k: &S::Key) -> Option<S::Val> {
        let e = slots::find(self, k)?;
        // SAFETY: a slot of the mapping.
        let (seq, key, v) = unsafe { slots::snapshot::<Self>(e.slot) }?;
        (seq & !slots::SEQ_SET_LOCK == e.seq & !slots::SEQ_SET_LOCK && key == *k).then_some(v)
    }

    /// Writes `k → v` over `k`'s entry, into an empty way or over the set's oldest entry,
    /// waiting while the datapath holds the set. False if it stayed busy.
    pub fn put(&self, k: &S::Key, v: &S::Val) -> bool {
        for _ in 0..PUT_TRIES {
            match slots::insert(self, k, v, u64::MAX, |_| false) {
                Put::Inserted { .. } | Put::Existing(_) => return true,
                Put::Busy => std::hint::spin_loop(),
            }
        }
        false
    }

    /// Empties the slot of `e` if it still holds what `e` read.
    pub fn remove(&self, e: &Entry<S>) -> bool {
        slots::remove::<Self>(e)
    }

    /// Non-empty slots.
    pub fn len(&self) -> usize {
        let mut n = 0;
        self.walk(8192, |k, _, _| {
            n += k.len();
            true
        });
        n
    }

    /// Whether every slot is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: Slot> Drop for SlotTable<S> {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

impl<S: Slot> Mem for SlotTable<S> {
    type S = S;
    fn set(&self, i: u32) -> Option<*mut S> {
        // SAFETY: within the mapping.
        (i < self.sets()).then(|| unsafe { self.base.add((i * SLOT_WAYS) as usize) })
    }
    fn sets(&self) -> u32 {
        self.sets
    }
    unsafe fn fetch_or(p: *mut u32, v: u32) -> u32 {
        // SAFETY: `p` is a slot's 4-byte aligned `seq` in the mapping (caller); every access to
        // it, kernel or user, is atomic.
        unsafe { AtomicU32::from_ptr(p) }.fetch_or(v, Ordering::SeqCst)
    }
    unsafe fn fetch_add(p: *mut u32, v: u32) -> u32 {
        // SAFETY: as above.
        unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::SeqCst)
    }
}
