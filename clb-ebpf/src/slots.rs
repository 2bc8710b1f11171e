//! The datapath's side of the in-place tables (`clb_common::slots`, where the placement and
//! the sequence-lock protocol are written once for both sides): each table is a map plus
//! the number of sets the loader gave it, and BPF's atomic instructions.
//!
//! Lookups and inserts go through global BPF functions, one pair per table ([`Table`]): the
//! verifier checks a global function once, apart from its callers, which see only its result.
//! Inlined, the ways and retries of every lookup and insert multiplied the states of all the
//! code after them (the IPv6 program went from 0.32 M to 0.93 M verified instructions, the
//! limit being 1 M); as calls they cost a few ns each.

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

use clb_common::{
    ConnKey, ConnKey6, HalfOpenValue, HalfSlot, HalfSlot6, PendSlot, PendSlot6, SLOT_WAYS,
    SessionKey, SessionKey6, SessionValue, is_expired,
    slots::{self, Entry, Mem, Put, Slot},
};

use crate::maps::{
    CLB_HALF_V3, CLB_HALF6_V3, CLB_PSESS_V2, CLB_PSESS6_V2, CLB_SLOT_SETS, CLB_SLOT_SETS6,
};

/// What [`Table::put`] did.
pub enum Placed {
    /// The entry is written; `evicted`: over another key's live entry (the set's oldest).
    Stored { evicted: bool },
    /// The key had a live entry (see [`Table::put`]) naming this backend: nothing written.
    Existing(u32),
    /// Other CPUs kept the set busy: nothing written.
    Busy,
}

/// A set of a table: one map value, [`SLOT_WAYS`] slots.
pub type Set<S> = [S; SLOT_WAYS as usize];

/// A table's lookup and insert, through its global functions.
pub trait Table: Mem + Default {
    /// [`slots::find`].
    fn find(k: &<Self::S as Slot>::Key) -> Option<Entry<Self::S>>;
    /// [`slots::insert`] of `v` into `k`'s set, entries seen within `live_ns` counted live.
    /// With `persist_ns` ≠ 0 an entry of the key seen within that is kept and returned instead
    /// (a pending choice another flow made; whether its backend still accepts is the caller's
    /// to judge, so the function makes no helper call and needs almost no stack of its own).
    fn put(
        k: &<Self::S as Slot>::Key,
        v: &<Self::S as Slot>::Val,
        now: u64,
        live_ns: u64,
        persist_ns: u64,
    ) -> Placed;
}

/// Declares the zero-sized [`Mem`] of one table and its global functions. These take the
/// set, which the caller looks up (so they make no helper call and need almost no stack:
/// the IPv6 program's own frame leaves them little).
macro_rules! table {
    ($(#[$m:meta])* $name:ident, $slot:ty, $key:ty, $val:ty, $map:ident, $sets:ident,
     $locate:ident, $insert:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Default)]
        pub struct $name;

        impl Mem for $name {
            type S = $slot;
            #[inline(always)]
            fn set(&self, i: u32) -> Option<*mut $slot> {
                $map.get_ptr_mut(i).map(|p| p.cast::<$slot>())
            }
            #[inline(always)]
            fn sets(&self) -> u32 {
                // SAFETY: a plain read of a global the loader set (`.rodata`: the verifier
                // knows its value).
                unsafe { core::ptr::read_volatile(&raw const $sets) }
            }
            #[inline(always)]
            unsafe fn fetch_or(p: *mut u32, v: u32) -> u32 {
                // SAFETY: `p` is a slot's `seq` in a map value (caller). SeqCst: BPF's
                // fetching atomics are full barriers; LLVM lowers weaker fetching orders to
                // non-fetching instructions (see `schedule::cursor`).
                unsafe { atomic_or::<u32, u32, { AtomicOrdering::SeqCst }>(p, v) }
            }
            #[inline(always)]
            unsafe fn fetch_add(p: *mut u32, v: u32) -> u32 {
                // SAFETY: as above.
                unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, v) }
            }
        }

        /// [`slots::locate_in`] as a global function: 0 if absent, else the way + 1 in the
        /// low and the `seq` in the high 32 bits.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $locate(set: *mut Set<$slot>, k: *const $key) -> u64 {
            // SAFETY: the verifier passes a global function's pointer arguments as possibly
            // NULL, else valid for the pointee's size; `set` is a set of the table.
            let (Some(set), Some(k)) = (unsafe { set.as_mut() }, unsafe { k.as_ref() }) else {
                return 0;
            };
            // SAFETY: as above.
            match unsafe { slots::locate_in::<$name>(set.as_mut_ptr(), k) } {
                Some((w, seq)) => (u64::from(w) + 1) | (u64::from(seq) << 32),
                None => 0,
            }
        }

        /// [`slots::insert_in`] as a global function (a set another CPU holds is tried a few
        /// times). The value comes in two registers (its 16 bytes: no stack in the caller
        /// either), and with [`KEEP`] set in `live_from` any non-empty entry of the key is kept:
        /// 0 stored, 3 stored over a live entry, 1 busy, 2 | way << 8 | backend << 32 an
        /// existing entry kept.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $insert(
            set: *mut Set<$slot>,
            k: *const $key,
            v0: u64,
            v1: u64,
            live_from: u64,
        ) -> u64 {
            // SAFETY: as above.
            let (Some(set), Some(k)) = (unsafe { set.as_mut() }, unsafe { k.as_ref() }) else {
                return 1;
            };
            let v: $val = bytemuck::cast([v0, v1]);
            let keep = live_from & KEEP != 0;
            let first = set.as_mut_ptr();
            let mut tries = 0;
            while tries < INSERT_TRIES {
                // SAFETY: as above.
                match unsafe {
                    slots::insert_in::<$name>(first, k, &v, live_from & !KEEP, |_| keep)
                } {
                    Put::Inserted { evicted } => return if evicted { 3 } else { 0 },
                    Put::Existing(e) => {
                        // SAFETY: a way of this set: its position, and its backend as it is.
                        let w = unsafe { e.slot.offset_from(first) } as u64;
                        return 2 | (w << 8) | (u64::from(e.val().backend) << 32);
                    }
                    Put::Busy => tries += 1,
                }
            }
            1
        }

        impl Table for $name {
            #[inline(always)]
            fn find(k: &$key) -> Option<Entry<$slot>> {
                let set = $map.get_ptr_mut(slots::set_of(&$name, k)?)?;
                let r = $locate(set, k);
                if r == 0 {
                    return None;
                }
                let w = (r as u32).wrapping_sub(1) & (SLOT_WAYS - 1);
                Some(Entry {
                    // SAFETY: way `w` of the set.
                    slot: unsafe { set.cast::<$slot>().add(w as usize) },
                    seq: (r >> 32) as u32,
                })
            }
            #[inline(always)]
            fn put(k: &$key, v: &$val, now: u64, live_ns: u64, persist_ns: u64) -> Placed {
                let Some(set) = slots::set_of(&$name, k).and_then(|i| $map.get_ptr_mut(i)) else {
                    return Placed::Busy;
                };
                let [v0, v1]: [u64; 2] = bytemuck::cast(*v);
                let live_from = now.saturating_sub(live_ns);
                let keep = if persist_ns != 0 { KEEP } else { 0 };
                match $insert(set, k, v0, v1, live_from | keep) {
                    0 => Placed::Stored { evicted: false },
                    3 => Placed::Stored { evicted: true },
                    1 => Placed::Busy,
                    r => {
                        let w = ((r >> 8) & u64::from(SLOT_WAYS - 1)) as usize;
                        // SAFETY: way `w` of the set: the entry kept, as it is now.
                        let seen = unsafe { (*set)[w].val.last_seen_ns };
                        if !is_expired(now, seen, persist_ns) {
                            Placed::Existing((r >> 32) as u32)
                        } else {
                            // Expired: replaced.
                            match $insert(set, k, v0, v1, live_from) {
                                1 => Placed::Busy,
                                r => Placed::Stored { evicted: r == 3 },
                            }
                        }
                    }
                }
            }
        }
    };
}

const _: () = assert!(SLOT_WAYS.is_power_of_two());
const _: () = assert!(size_of::<HalfOpenValue>() == 16 && size_of::<SessionValue>() == 16);

/// Tries of an insert whose set another CPU holds (for a few ns: a writer is never
/// preempted in XDP).
const INSERT_TRIES: u32 = 3;

/// Flag in an insert's `live_from`: keep an existing entry of the key.
const KEEP: u64 = 1 << 63;

table!(
    /// The IPv4 half-open table.
    Half4,
    HalfSlot,
    ConnKey,
    HalfOpenValue,
    CLB_HALF_V3,
    CLB_SLOT_SETS,
    clb_locate_half,
    clb_insert_half
);
table!(
    /// The IPv6 half-open table.
    Half6,
    HalfSlot6,
    ConnKey6,
    HalfOpenValue,
    CLB_HALF6_V3,
    CLB_SLOT_SETS6,
    clb_locate_half6,
    clb_insert_half6
);
table!(
    /// The IPv4 pending-persistence table.
    Pend4,
    PendSlot,
    SessionKey,
    SessionValue,
    CLB_PSESS_V2,
    CLB_SLOT_SETS,
    clb_locate_pend,
    clb_insert_pend
);
table!(
    /// The IPv6 pending-persistence table.
    Pend6,
    PendSlot6,
    SessionKey6,
    SessionValue,
    CLB_PSESS6_V2,
    CLB_SLOT_SETS6,
    clb_locate_pend6,
    clb_insert_pend6
);
