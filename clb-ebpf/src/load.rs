//! Active connections per backend ([`CLB_LOAD_V1`]) and the least-connections choice.
//!
//! A verified flow counts while its entry is in state `CONN_OPEN`: [`opened`] when an entry
//! enters it (a promotion, an RST-ed flow whose both ends went on), [`closed`] when it leaves
//! it (FIN or RST from either end, as far as clb sees them). Entries that leave without a
//! packet — idle expiry, LRU eviction, purges — are corrected by the sweeper from its walk.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use clb_common::{LC_SCAN, SCHED_ID_MASK, counter};

use crate::{
    backends,
    maps::{CLB_LOAD_V1, CLB_SCHED_V2},
};

/// Adds `delta` (two's complement) to backend `b`'s active count.
#[inline(always)]
fn add(b: u32, delta: u64) {
    if let Some(l) = CLB_LOAD_V1.get_ptr_mut(b) {
        // SAFETY: an 8-byte aligned field of a map value that lives as long as the map; every
        // CPU and user space change it only with atomic adds. SeqCst for the reason given in
        // `schedule::cursor` (a relaxed add loses its result on LLVM 22's BPF backend;
        // here the result is unused, but the fetching form is the one known to be right).
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*l).active, delta);
        }
    }
}

/// Backend `b` has one more open connection.
#[inline(always)]
pub fn opened(b: u32) {
    add(b, 1);
}

/// Backend `b` has one open connection fewer.
#[inline(always)]
pub fn closed(b: u32) {
    add(b, u64::MAX);
}

/// [`least`] as a global BPF function: the verifier checks it once, apart from its callers
/// (inlined at each call site, its loop over 32 slots multiplied the states of the code around
/// it and took the IPv6 program past the verifier's million-instruction budget). Returns the
/// backend id, or `u64::MAX` when no slot names an accepting backend.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn clb_least_conn(id: u32, start: u64) -> u64 {
    // Few values live across the helper calls, packed, so that they stay in the four
    // callee-saved registers: the IPv6 program's frame leaves a global function 48 bytes of
    // stack (512 in all).
    let Some(inner) = CLB_SCHED_V2.get(id) else {
        return u64::MAX;
    };
    let Some(&len) = inner.get(0) else {
        return u64::MAX;
    };
    if len == 0 || len > SCHED_ID_MASK {
        return u64::MAX;
    }
    let Some(pos) = start.checked_rem(u64::from(len)) else {
        return u64::MAX;
    };
    let n = if len < LC_SCAN { len } else { LC_SCAN };
    // Bits 0-15 the slot position, 16-31 the length, 32-47 the slots left to compare.
    let mut cur = pos | (u64::from(len) << 16) | (u64::from(n) << 32);
    // The best so far: backend id | weight << 16 (u64::MAX: none yet), and its count.
    let mut best = u64::MAX;
    let mut best_active = 0u64;
    let mut i = 0;
    while i < LC_SCAN {
        i += 1;
        if cur >> 32 == 0 {
            break;
        }
        let (pos, len) = ((cur & 0xffff) as u32, ((cur >> 16) & 0xffff) as u32);
        let next = if pos + 1 >= len { 0 } else { pos + 1 };
        cur = ((cur & !0xffff) - (1 << 32)) | u64::from(next);
        let Some(&v) = inner.get(pos + 1) else {
            continue;
        };
        let b = v & SCHED_ID_MASK;
        if !backends::accepting(b) {
            continue;
        }
        let Some(l) = CLB_LOAD_V1.get(b) else {
            continue;
        };
        // A count the sweeper is correcting may be transiently negative: none.
        let active = if (l.active as i64) < 0 { 0 } else { l.active };
        let weight = u64::from(v >> 16).max(1);
        // active / weight < best_active / best_weight, without division.
        if best == u64::MAX || active * ((best >> 16) & 0xffff) < best_active * weight {
            best = u64::from(b) | (weight << 16);
            best_active = active;
        }
    }
    if best == u64::MAX {
        return u64::MAX;
    }
    best & u64::from(SCHED_ID_MASK)
}

/// The accepting backend of listener `id` with the fewest active connections per unit of
/// weight, comparing up to [`LC_SCAN`] schedule slots from the rotating `start` (so equally
/// loaded backends take turns). The schedule lists each accepting backend once, its weight in
/// the slot's upper bits (`clb_common::lc_slot`).
#[inline(always)]
pub fn least(id: u32, start: u64) -> Result<u32, u32> {
    match clb_least_conn(id, start) {
        u64::MAX => Err(counter::DROP_NO_BACKEND),
        b => Ok(b as u32),
    }
}
