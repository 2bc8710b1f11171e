//! Per-CPU counters: verdicts, events and drop reasons (indexed by `clb_common::counter`),
//! plus traffic per listener and per backend. Counters, not logs, on the hot path.

use clb_common::TrafficCounters;

use crate::maps::{CLB_BE_STAT_V1, CLB_COUNT_V2, CLB_LSN_STAT_V1};

/// Adds one to global counter `idx`.
#[inline(always)]
pub fn count(idx: u32) {
    if let Some(v) = CLB_COUNT_V2.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *v += 1 };
    }
}

/// This CPU's traffic counters of listener `id`.
#[inline(always)]
pub fn listener(id: u32) -> Option<&'static mut TrafficCounters> {
    // SAFETY: per-CPU slot, as above.
    CLB_LSN_STAT_V1.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

/// This CPU's traffic counters of backend `id`.
#[inline(always)]
pub fn backend(id: u32) -> Option<&'static mut TrafficCounters> {
    // SAFETY: per-CPU slot, as above.
    CLB_BE_STAT_V1.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

/// Counts a client → backend packet of `len` bytes.
#[inline(always)]
pub fn forward(listener_id: u32, backend_id: u32, len: u16) {
    if let Some(c) = listener(listener_id) {
        c.fwd_packets += 1;
        c.fwd_bytes += u64::from(len);
    }
    if let Some(c) = backend(backend_id) {
        c.fwd_packets += 1;
        c.fwd_bytes += u64::from(len);
    }
}

/// Counts a backend → client packet of `len` bytes.
#[inline(always)]
pub fn reply(listener_id: u32, backend_id: u32, len: u16) {
    if let Some(c) = listener(listener_id) {
        c.rev_packets += 1;
        c.rev_bytes += u64::from(len);
    }
    if let Some(c) = backend(backend_id) {
        c.rev_packets += 1;
        c.rev_bytes += u64::from(len);
    }
}

/// Applies `f` to the counters of both the listener and the backend.
#[inline(always)]
pub fn both(listener_id: u32, backend_id: u32, f: impl Fn(&mut TrafficCounters)) {
    if let Some(c) = listener(listener_id) {
        f(c);
    }
    if let Some(c) = backend(backend_id) {
        f(c);
    }
}
