//! Weighted round robin. User space computes each listener's smooth-WRR sequence and writes it
//! into `CLB_SCHED_V1`; the kernel only indexes it with a cursor shared by all CPUs.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use clb_common::{ListenerInfo, SCHED_SLOTS, counter};

use crate::{
    backends,
    maps::{CLB_RR_V1, CLB_SCHED_V1},
};

/// Slots tried past the cursor when a slot names a backend that stopped accepting (the
/// schedule is rewritten right after such a change; this only covers the moment between).
const PROBES: u32 = 4;

/// The next backend of listener `id` in round-robin order, or the drop reason.
#[inline(always)]
pub fn pick(id: u32, lsn: &ListenerInfo) -> Result<u32, u32> {
    let len = lsn.sched_len();
    if len == 0 || len > SCHED_SLOTS {
        return Err(counter::DROP_NO_BACKEND);
    }
    let base = id * 2 * SCHED_SLOTS + lsn.sched_half() * SCHED_SLOTS;
    let cursor = match CLB_RR_V1.get_ptr_mut(id) {
        // SAFETY: an 8-byte aligned map value that lives as long as the map; every CPU
        // touches it only through this atomic add. `AtomicU64::fetch_add` is not offered on
        // the BPF target (no compare-and-swap there), but the fetch-and-add instruction is
        // (ISA v3, see build.rs). SeqCst, not Relaxed: LLVM 22's BPF backend lowers a relaxed
        // fetch-add to the non-fetching `lock +=` and then uses the addend as the "result"
        // (seen in the disassembly: the cursor was always 1).
        Some(p) => unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, 1) },
        None => return Err(counter::DROP_NO_BACKEND),
    };
    let mut i = 0;
    while i < PROBES {
        // `checked_rem`: `len` is known non-zero, but a plain `%` still leaves a panic path
        // the verifier rejects.
        let Some(slot) = cursor
            .wrapping_add(u64::from(i))
            .checked_rem(u64::from(len))
        else {
            break;
        };
        let slot = slot as u32;
        if let Some(&b) = CLB_SCHED_V1.get(base + slot)
            && backends::accepting(b)
        {
            return Ok(b);
        }
        i += 1;
    }
    Err(counter::DROP_NO_BACKEND)
}
