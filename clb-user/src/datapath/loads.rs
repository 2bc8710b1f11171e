//! User space's side of the active-connection counts (`clb_common::LOAD_MAP`): the map is
//! mapped into this process's memory (`BPF_F_MMAPABLE`), so reading every backend's count is a
//! memory read, and the sweeper's corrections are atomic adds on the same words the datapath
//! adds to — neither loses the other's update.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use clb_common::BackendLoad;

/// The load table, mapped.
pub struct LoadTable {
    map: MapData,
    base: *mut BackendLoad,
    len: u32,
    bytes: usize,
}

// SAFETY: the mapping is memory shared with the kernel, accessed only through atomics; the
// handle owns it.
unsafe impl Send for LoadTable {}
// SAFETY: as above.
unsafe impl Sync for LoadTable {}

impl LoadTable {
    /// Maps the array behind `map` (values [`BackendLoad`], created `BPF_F_MMAPABLE`).
    pub fn new(map: MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        if info.value_size() as usize != size_of::<BackendLoad>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "load table has {}-byte values, this clb's are {} bytes",
                    info.value_size(),
                    size_of::<BackendLoad>()
                ),
            ));
        }
        let len = info.max_entries();
        let (p, bytes) = super::slots::map_shared(&map, len as usize * size_of::<BackendLoad>())?;
        Ok(Self {
            map,
            base: p.cast(),
            len,
            bytes,
        })
    }

    /// Maps the table behind `map` through a handle of its own (by map id).
    pub fn of(map: &MapData) -> io::Result<Self> {
        let id = map.info().map_err(io::Error::other)?.id();
        Self::new(MapData::from_id(id).map_err(io::Error::other)?)
    }

    /// The map handle.
    pub fn map(&self) -> &MapData {
        &self.map
    }

    fn cell(&self, id: u32) -> Option<&AtomicU64> {
        // SAFETY: within the mapping; `active` is an 8-byte aligned word every writer, kernel
        // or user, changes only atomically.
        (id < self.len)
            .then(|| unsafe { AtomicU64::from_ptr(&raw mut (*self.base.add(id as usize)).active) })
    }

    /// Backend `id`'s active connections (a transiently negative count as it is).
    pub fn active(&self, id: u32) -> i64 {
        self.cell(id)
            .map_or(0, |c| c.load(Ordering::Relaxed) as i64)
    }

    /// Every backend's count, by id.
    pub fn all(&self) -> Vec<i64> {
        (0..self.len).map(|id| self.active(id)).collect()
    }

    /// Adds `delta` to backend `id`'s count.
    pub fn add(&self, id: u32, delta: i64) {
        if let Some(c) = self.cell(id) {
            c.fetch_add(delta as u64, Ordering::SeqCst);
        }
    }
}

impl Drop for LoadTable {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}
