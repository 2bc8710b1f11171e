//! Picking a backend for a new flow from the listener's schedule, an inner array user space
//! computes and replaces whole: slot 0 holds the length `n`, slots `1..=n` backend ids.
//!
//! - Weighted round robin (the default, the cloud service's "polling"): `n` is the smooth-WRR
//!   sequence; a cursor shared by all CPUs indexes it, so consecutive new connections take
//!   consecutive slots.
//! - Weighted least connections: the schedule lists each accepting backend once and
//!   [`load::least`] compares their active connections per unit of weight; the same cursor
//!   rotates where the comparison starts, so equally loaded backends take turns.
//! - Maglev, and any listener in flood mode: a hash of the client (masked, with persistence)
//!   or of the 5-tuple (without) indexes it, so the choice is a pure function of the packet
//!   and the configuration: every node, and the ACK of a SYN whose state was lost, agree.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use clb_common::{LISTENER_F_LC, ListenerInfo, SCHED_ID_MASK, counter};

use crate::{
    backends, load,
    maps::{CLB_RR_V1, CLB_SCHED_V2},
};

/// Slots tried past the first when a slot names a backend that stopped accepting (the
/// schedule is rewritten right after such a change; this only covers the moment between).
const PROBES: u32 = 4;

/// The backend at position `pos` (probing onwards) of listener `id`'s schedule.
#[inline(always)]
fn at(id: u32, pos: u64) -> Result<u32, u32> {
    let Some(&len) = CLB_SCHED_V2.get_value(id, &0) else {
        return Err(counter::DROP_NO_BACKEND);
    };
    if len == 0 {
        return Err(counter::DROP_NO_BACKEND);
    }
    let mut i = 0;
    while i < PROBES {
        // `checked_rem`: `len` is known non-zero, but a plain `%` still leaves a panic path
        // the verifier rejects.
        let Some(slot) = pos.wrapping_add(u64::from(i)).checked_rem(u64::from(len)) else {
            break;
        };
        if let Some(&v) = CLB_SCHED_V2.get_value(id, &(slot as u32 + 1))
            && backends::accepting(v & SCHED_ID_MASK)
        {
            return Ok(v & SCHED_ID_MASK);
        }
        i += 1;
    }
    Err(counter::DROP_NO_BACKEND)
}

/// Listener `id`'s cursor, advanced by one for every CPU's next new flow.
#[inline(always)]
fn cursor(id: u32) -> Result<u64, u32> {
    match CLB_RR_V1.get_ptr_mut(id) {
        // SAFETY: an 8-byte aligned map value that lives as long as the map; every CPU
        // touches it only through this atomic add. `AtomicU64::fetch_add` is not offered on
        // the BPF target (no compare-and-swap there), but the fetch-and-add instruction is
        // (ISA v3, see build.rs). SeqCst, not Relaxed: LLVM 22's BPF backend lowers a relaxed
        // fetch-add to the non-fetching `lock +=` and then uses the addend as the "result"
        // (seen in the disassembly: the cursor was always 1).
        Some(p) => Ok(unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, 1) }),
        None => Err(counter::DROP_NO_BACKEND),
    }
}

/// The next backend of listener `id` in round-robin order, or the drop reason.
#[inline(always)]
pub fn round_robin(id: u32) -> Result<u32, u32> {
    at(id, cursor(id)?)
}

/// A new flow's backend by listener `id`'s own scheduler: weighted least connections
/// (`LISTENER_F_LC`, the cursor rotating where the scan starts) or round robin. Maglev and the
/// stateless hash are [`hashed`].
#[inline(always)]
pub fn next(lsn: &ListenerInfo, id: u32) -> Result<u32, u32> {
    if lsn.flags & LISTENER_F_LC != 0 {
        load::least(id, cursor(id)?)
    } else {
        round_robin(id)
    }
}

/// The backend the hash `h` names in listener `id`'s schedule.
#[inline(always)]
pub fn hashed(id: u32, h: u32) -> Result<u32, u32> {
    at(id, u64::from(h))
}
