//! In-place tables: the half-open and pending-persistence tables are BPF arrays of slots that
//! the datapath reads and writes in place, not hash maps. A SYN then costs no map-update
//! helper call (a hash or LRU update is ~200 ns of kernel code per call on this project's
//! machines; an inlined array lookup and a few atomic instructions are ~20 ns), and every
//! lookup is an inlined array access.
//!
//! Layout: a table of `n` slots is an array of `n / SLOT_WAYS` sets, each one map value of
//! [`SLOT_WAYS`] slots (one lookup reaches all the ways of a set, and the verifier sees every
//! way as a constant offset into it); a key lives in the set its [`Slot::hash`] names, in any
//! of its ways. A new key takes the first empty way, else the way seen longest ago (an LRU
//! within the set; [`Put::Inserted`] says whether it pushed out a live entry). Ways are thus
//! taken in order and never given back (an emptied way keeps its key), so a scan stops at the
//! first way never written (`seq` 0): in a sparse table a lookup reads one cache line.
//!
//! Concurrency — the same code runs in the datapath on every CPU and in user space (the
//! sweeper, resizes, tests), through [`Mem`]. Each slot's `seq` word is a sequence lock:
//! - bit [`SEQ_BUSY`]: a writer is changing the slot's contents (taken with an atomic
//!   fetch-or, so exactly one writer gets it); released by adding [`SEQ_BUSY`], which also
//!   bumps the version in the bits above;
//! - bit [`SEQ_SET_LOCK`] of a set's first slot: an insert holds the set, so two CPUs never
//!   insert the same key twice (parallel SYNs of one new client share one pending entry);
//!   keys change only under it.
//!
//! Readers take no lock: they read `seq`, the slot, `seq` again (each `seq` read an atomic
//! fetch-add of 0, a full barrier on every architecture), and retry a few times if a writer
//! was at work. A value can be rewritten only by someone who read it unchanged ([`update`]),
//! so concurrent changes never mix. (Compare-and-swap is not used: bitcode with `cmpxchg` from
//! Rust 1.98 is rejected by the LLVM 22 that bpf-linker is built against; fetch-or is a
//! test-and-set.)

use crate::{
    ConnKey, ConnKey6, HASH_SEED, HalfOpenValue, SessionKey, SessionKey6, SessionValue, fold6,
    jhash_3words,
};

/// Ways (slots) per set.
pub const SLOT_WAYS: u32 = 8;
/// `seq` bit of a set's first slot: an insert holds the set.
pub const SEQ_SET_LOCK: u32 = 1;
/// `seq` bit: a writer is changing the slot; versions count in the bits above.
pub const SEQ_BUSY: u32 = 2;
/// Consistent reads tried before a slot a writer holds counts as unreadable.
const READ_TRIES: u32 = 3;

/// Releases a slot's busy bit (adding `add`: [`SEQ_BUSY`], or `SEQ_BUSY - SEQ_SET_LOCK` to
/// release the set lock with it), bumping its version. A version that wraps to 0 is bumped once
/// more: `seq == 0` means "never written", where lookups stop.
///
/// # Safety
/// `seq` is a live slot's `seq` whose busy bit the caller holds.
#[inline(always)]
unsafe fn release<M: Mem>(seq: *mut u32, add: u32) {
    // SAFETY: caller.
    let old = unsafe { M::fetch_add(seq, add) };
    if old.wrapping_add(add) & !(SEQ_BUSY | SEQ_SET_LOCK) == 0 {
        // SAFETY: as above.
        unsafe { M::fetch_add(seq, SEQ_BUSY << 1) };
    }
}

/// Whether slot `s` was never written (its `seq` is 0): the ways of a set are taken in order
/// and never given back, so no key sits beyond such a way.
///
/// # Safety
/// `s` points at a live slot.
#[inline(always)]
unsafe fn unused<M: Mem>(s: *mut M::S) -> bool {
    // SAFETY: caller; a plain look (a stale value only makes the scan go on).
    unsafe { core::ptr::read_volatile(M::S::seq(s)) == 0 }
}

/// Sets (map entries) of an in-place table of `capacity` slots (any remainder below
/// [`SLOT_WAYS`] is not used).
#[inline(always)]
pub const fn slot_sets(capacity: u32) -> u32 {
    capacity / SLOT_WAYS
}

/// A slot type of an in-place table: its key, its value, where they sit.
pub trait Slot: Copy + 'static {
    type Key: Copy + PartialEq;
    type Val: Copy;
    /// The set-placement hash of a key (same on both sides of the kernel boundary).
    fn hash(k: &Self::Key) -> u32;
    /// Whether the key at `a` equals `b`, compared word by word without a branch per field
    /// (each branch is a path the verifier walks, in every way of every lookup).
    ///
    /// # Safety
    /// `a` points at a readable key.
    unsafe fn same(a: *const Self::Key, b: &Self::Key) -> bool;
    /// The value's last-seen time, ns; 0 marks an empty slot.
    fn last_seen(v: &Self::Val) -> u64;
    /// The value of an empty slot.
    fn empty() -> Self::Val;
    fn seq(s: *mut Self) -> *mut u32;
    fn key(s: *mut Self) -> *mut Self::Key;
    fn val(s: *mut Self) -> *mut Self::Val;
}

/// How one side reaches a table: its sets, their number, its atomic instructions.
pub trait Mem {
    type S: Slot;
    /// The first slot of set `i` (its other ways follow it: a set is one map value), if
    /// within the table.
    fn set(&self, i: u32) -> Option<*mut Self::S>;
    /// The table's sets.
    fn sets(&self) -> u32;
    /// Atomic, sequentially consistent fetch-or and fetch-add on a slot's `seq`.
    ///
    /// # Safety
    /// `p` points at a live slot's `seq`.
    unsafe fn fetch_or(p: *mut u32, v: u32) -> u32;
    /// # Safety
    /// As [`Mem::fetch_or`].
    unsafe fn fetch_add(p: *mut u32, v: u32) -> u32;
}

type Key<M> = <<M as Mem>::S as Slot>::Key;
type Val<M> = <<M as Mem>::S as Slot>::Val;

/// A slot found holding a key, with the `seq` it was found under: [`update`] changes it only
/// if nothing changed it since. Its value is read in place ([`Entry::val`]), as a hash map's
/// value would be: the datapath keeps no copy of it across the program (a copy's every field
/// becomes state the verifier carries down every path that follows). The pointer is valid
/// while the table is (in the datapath: for the program run that found it).
pub struct Entry<S: Slot> {
    pub slot: *mut S,
    pub seq: u32,
}

impl<S: Slot> Entry<S> {
    /// The slot's value, as it is now.
    #[inline(always)]
    pub fn val(&self) -> &S::Val {
        // SAFETY: a slot of a live table (see the type's docs); other CPUs may change
        // fields under a reader, as with any map value.
        unsafe { &*S::val(self.slot) }
    }
}

impl<S: Slot> Clone for Entry<S> {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<S: Slot> Copy for Entry<S> {}

/// The outcome of [`insert`].
pub enum Put<S: Slot> {
    /// Written; `evicted`: the way it took held another key's live entry (seen at or after
    /// `live_from`), which is gone now.
    Inserted { evicted: bool },
    /// The key was there and `keep` kept it.
    Existing(Entry<S>),
    /// Another writer held the set or the way: nothing written.
    Busy,
}

/// The set of `k`.
#[inline(always)]
pub fn set_of<M: Mem>(m: &M, k: &Key<M>) -> Option<u32> {
    M::S::hash(k).checked_rem(m.sets())
}

/// Way `w` of the set whose first slot is `first`.
///
/// # Safety
/// `first` is a set's first slot and `w < SLOT_WAYS`.
#[inline(always)]
unsafe fn way<S: Slot>(first: *mut S, w: u32) -> *mut S {
    // SAFETY: within the set (caller).
    unsafe { first.add(w as usize) }
}

/// Slot `idx` of the table (way `idx % SLOT_WAYS` of set `idx / SLOT_WAYS`).
#[inline(always)]
pub fn slot<M: Mem>(m: &M, idx: u32) -> Option<*mut M::S> {
    let first = m.set(idx / SLOT_WAYS)?;
    // SAFETY: a set's first slot, and a way below `SLOT_WAYS`.
    Some(unsafe { way(first, idx % SLOT_WAYS) })
}

/// The `seq` under which slot `s` was seen holding `k` with a non-empty value, read
/// consistently (key and last-seen time between two `seq` reads); `None` if it holds another
/// key, is empty, or writers kept it busy. Nothing is copied but the time (the IPv6
/// datapath's stack is small, and every copy is state the verifier carries on).
///
/// # Safety
/// `s` points at a live slot.
#[inline(always)]
pub unsafe fn read<M: Mem>(s: *mut M::S, k: &Key<M>) -> Option<u32> {
    let seq = M::S::seq(s);
    let mut t = 0;
    while t < READ_TRIES {
        // SAFETY: a live slot (caller).
        let s1 = unsafe { M::fetch_add(seq, 0) };
        if s1 & SEQ_BUSY == 0 {
            // SAFETY: as above. What is read here is checked by the second `seq` read; the
            // atomic instructions keep these reads between the two.
            let live = unsafe { holds::<M>(s, k) && seen::<M>(s) != 0 };
            // SAFETY: as above.
            let s2 = unsafe { M::fetch_add(seq, 0) };
            if s1 & !SEQ_SET_LOCK == s2 & !SEQ_SET_LOCK {
                return live.then_some(s1);
            }
        }
        t += 1;
    }
    None
}

/// A consistent (seq, key, value) of slot `s` (empty or not), or `None` if writers kept it
/// busy. For walks in user space; the datapath never copies keys ([`read`]).
///
/// # Safety
/// `s` points at a live slot.
#[inline(always)]
pub unsafe fn snapshot<M: Mem>(s: *mut M::S) -> Option<(u32, Key<M>, Val<M>)> {
    let seq = M::S::seq(s);
    let mut t = 0;
    while t < READ_TRIES {
        // SAFETY: a live slot (caller).
        let s1 = unsafe { M::fetch_add(seq, 0) };
        if s1 & SEQ_BUSY == 0 {
            // SAFETY: as in `read`.
            let (k, v) = unsafe {
                (
                    core::ptr::read_volatile(M::S::key(s)),
                    core::ptr::read_volatile(M::S::val(s)),
                )
            };
            // SAFETY: as above.
            let s2 = unsafe { M::fetch_add(seq, 0) };
            if s1 & !SEQ_SET_LOCK == s2 & !SEQ_SET_LOCK {
                return Some((s1, k, v));
            }
        }
        t += 1;
    }
    None
}

/// Whether slot `s` seems to hold `k` (a plain look; only such a way pays for [`read`]).
///
/// # Safety
/// `s` points at a live slot.
#[inline(always)]
unsafe fn holds<M: Mem>(s: *mut M::S, k: &Key<M>) -> bool {
    // SAFETY: caller.
    unsafe { M::S::same(M::S::key(s), k) }
}

/// The last-seen time of slot `s` (0: empty), read in place.
///
/// # Safety
/// `s` points at a live slot.
#[inline(always)]
unsafe fn seen<M: Mem>(s: *mut M::S) -> u64 {
    // SAFETY: caller.
    M::S::last_seen(unsafe { &*M::S::val(s) })
}

/// Where `k` sits in the set whose first slot is `first`: (way, `seq` it was found under),
/// if there (empty slots never match). Within a set a key sits in at most one way (inserts
/// keep it so), so the first way holding it is the one.
///
/// # Safety
/// `first` is the first slot of a set of a live table.
#[inline(always)]
pub unsafe fn locate_in<M: Mem>(first: *mut M::S, k: &Key<M>) -> Option<(u32, u32)> {
    let mut hit = None;
    let mut w = 0;
    while w < SLOT_WAYS {
        // SAFETY: a way of the set (caller).
        let s = unsafe { way(first, w) };
        // SAFETY: as above.
        if unsafe { unused::<M>(s) } {
            break;
        }
        // SAFETY: as above.
        if unsafe { holds::<M>(s, k) } {
            hit = Some(w);
            break;
        }
        w += 1;
    }
    let w = hit?;
    // SAFETY: as above.
    let seq = unsafe { read::<M>(way(first, w), k) }?;
    Some((w, seq))
}

/// Where `k` sits: (slot index, `seq` it was found under), if its table holds it.
#[inline(always)]
pub fn locate<M: Mem>(m: &M, k: &Key<M>) -> Option<(u32, u32)> {
    let set = set_of(m, k)?;
    let first = m.set(set)?;
    // SAFETY: the first slot of a set of the table.
    let (w, seq) = unsafe { locate_in::<M>(first, k) }?;
    Some((set * SLOT_WAYS + w, seq))
}

/// The entry of `k`, if its table holds one.
#[inline(always)]
pub fn find<M: Mem>(m: &M, k: &Key<M>) -> Option<Entry<M::S>> {
    let (idx, seq) = locate(m, k)?;
    Some(Entry {
        slot: slot(m, idx)?,
        seq,
    })
}

/// Changes the value of `e`'s slot with `f`, if the slot is unchanged since `e` was found.
/// Returns whether it did.
#[inline(always)]
pub fn update<M: Mem>(e: &Entry<M::S>, f: impl FnOnce(&mut Val<M>)) -> bool {
    let seq = M::S::seq(e.slot);
    // SAFETY: `e.slot` is a slot of a live table (`Entry`).
    let old = unsafe { M::fetch_or(seq, SEQ_BUSY) };
    if old & SEQ_BUSY != 0 {
        return false;
    }
    if old & !SEQ_SET_LOCK != e.seq & !SEQ_SET_LOCK {
        // SAFETY: as above; releases what this call took.
        unsafe { release::<M>(seq, SEQ_BUSY) };
        return false;
    }
    // SAFETY: as above, and this call holds the slot.
    unsafe {
        f(&mut *M::S::val(e.slot));
        release::<M>(seq, SEQ_BUSY);
    }
    true
}

/// Empties `e`'s slot (its key stays, so the key keeps its way), if unchanged since `e` was
/// found.
#[inline(always)]
pub fn remove<M: Mem>(e: &Entry<M::S>) -> bool {
    update::<M>(e, |v| *v = M::S::empty())
}

/// Puts `k → v` into `k`'s set. If `k` is there (non-empty) and `keep(its value)`, nothing
/// is written and the entry is returned; otherwise `k`'s way (empty or not), an empty way, or
/// the way seen longest ago is written (`evicted` if that way held another key's entry last
/// seen at or after `live_from`, ns).
#[inline(always)]
pub fn insert<M: Mem>(
    m: &M,
    k: &Key<M>,
    v: &Val<M>,
    live_from: u64,
    keep: impl Fn(&Val<M>) -> bool,
) -> Put<M::S> {
    let Some(first) = set_of(m, k).and_then(|set| m.set(set)) else {
        return Put::Busy;
    };
    // SAFETY: the first slot of a set of the table.
    unsafe { insert_in::<M>(first, k, v, live_from, keep) }
}

/// [`insert`] into the set whose first slot is `first`.
///
/// # Safety
/// `first` is the first slot of `k`'s set in a live table.
#[inline(always)]
pub unsafe fn insert_in<M: Mem>(
    first: *mut M::S,
    k: &Key<M>,
    v: &Val<M>,
    live_from: u64,
    keep: impl Fn(&Val<M>) -> bool,
) -> Put<M::S> {
    let lock = M::S::seq(first);
    // SAFETY: a slot of the table.
    if unsafe { M::fetch_or(lock, SEQ_SET_LOCK) } & SEQ_SET_LOCK != 0 {
        return Put::Busy;
    }
    // Holding the set: no other insert changes its keys. Values may change under us
    // (`update`); the way chosen is taken with its own busy bit before it is written.
    // The way chosen is tracked as an index, not a pointer: pointers to different ways are
    // different verifier states, and every one of them would walk all the code after this.
    let mut victim = 0;
    let mut oldest = u64::MAX;
    let mut same = false;
    let mut w = 0;
    while w < SLOT_WAYS {
        // SAFETY: a way of a set of the table.
        let s = unsafe { way(first, w) };
        // SAFETY: as above.
        if unsafe { unused::<M>(s) } {
            // No key beyond: the first empty way, or this one.
            if oldest != 0 {
                oldest = 0;
                victim = w;
            }
            break;
        }
        // SAFETY: as above.
        if unsafe { holds::<M>(s, k) } {
            victim = w;
            same = true;
            break;
        }
        // SAFETY: as above; a torn time only misguides the choice of way.
        let t = unsafe { seen::<M>(s) };
        if t < oldest {
            oldest = t;
            victim = w;
        }
        w += 1;
    }
    // SAFETY: as above.
    let s = unsafe { way(first, victim & (SLOT_WAYS - 1)) };
    if same
        // SAFETY: a slot of the table.
        && let Some(seq) = unsafe { read::<M>(s, k) }
        // SAFETY: as above. `keep` looks at the value as it is; held by no writer an
        // instant ago, it is at worst a refresh newer.
        && keep(unsafe { &*M::S::val(s) })
    {
        // SAFETY: releases the set lock.
        unsafe { M::fetch_add(lock, u32::MAX) };
        return Put::Existing(Entry { slot: s, seq });
    }
    let evicted = !same && oldest != 0 && oldest >= live_from;
    let seq = M::S::seq(s);
    // SAFETY: a slot of the table.
    if unsafe { M::fetch_or(seq, SEQ_BUSY) } & SEQ_BUSY != 0 {
        // SAFETY: releases the set lock.
        unsafe { M::fetch_add(lock, u32::MAX) };
        return Put::Busy;
    }
    // SAFETY: this call holds the way and the set.
    unsafe {
        core::ptr::write_volatile(M::S::key(s), *k);
        core::ptr::write_volatile(M::S::val(s), *v);
        if seq == lock {
            // The set's first way: one add releases both bits (…11 + 1 = …100: busy and
            // set lock clear, version + 1).
            release::<M>(seq, SEQ_BUSY - SEQ_SET_LOCK);
        } else {
            release::<M>(seq, SEQ_BUSY);
            M::fetch_add(lock, u32::MAX);
        }
    }
    Put::Inserted { evicted }
}

/// Declares a slot type: `seq`, the key, the value, with explicit padding (`$p1` after `seq`,
/// `$p2` after the key) so that the value is 8-byte aligned and nothing is hidden.
macro_rules! slot_type {
    ($(#[$m:meta])* $name:ident, $key:ty, $val:ty, $p1:ty, $p2:ty, $size:expr, $word:ty,
     |$k:ident| $hash:expr) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name {
            /// Sequence lock ([`SEQ_BUSY`], [`SEQ_SET_LOCK`], version above).
            pub seq: u32,
            pub _pad: $p1,
            pub key: $key,
            pub _pad2: $p2,
            pub val: $val,
        }
        const _: () = assert!(core::mem::size_of::<$name>() == $size);

        impl Slot for $name {
            type Key = $key;
            type Val = $val;
            #[inline(always)]
            fn hash($k: &$key) -> u32 {
                $hash
            }
            #[inline(always)]
            unsafe fn same(a: *const $key, b: &$key) -> bool {
                const N: usize = size_of::<$key>() / size_of::<$word>();
                const _: () = assert!(N * size_of::<$word>() == size_of::<$key>());
                const _: () = assert!(align_of::<$key>() >= align_of::<$word>());
                let (a, b) = (a.cast::<$word>(), (b as *const $key).cast::<$word>());
                let mut diff: $word = 0;
                let mut i = 0;
                while i < N {
                    // SAFETY: word `i` of two keys (aligned, in bounds: asserted above).
                    diff |= unsafe { *a.add(i) ^ *b.add(i) };
                    i += 1;
                }
                diff == 0
            }
            #[inline(always)]
            fn last_seen(v: &$val) -> u64 {
                v.last_seen_ns
            }
            #[inline(always)]
            fn empty() -> $val {
                <$val as bytemuck::Zeroable>::zeroed()
            }
            #[inline(always)]
            fn seq(s: *mut Self) -> *mut u32 {
                // A field's address, computed without touching the slot.
                s.wrapping_byte_add(core::mem::offset_of!(Self, seq)).cast()
            }
            #[inline(always)]
            fn key(s: *mut Self) -> *mut $key {
                // A field's address, computed without touching the slot.
                s.wrapping_byte_add(core::mem::offset_of!(Self, key)).cast()
            }
            #[inline(always)]
            fn val(s: *mut Self) -> *mut $val {
                // A field's address, computed without touching the slot.
                s.wrapping_byte_add(core::mem::offset_of!(Self, val)).cast()
            }
        }
    };
}

/// Seed of the placement hash (not [`HASH_SEED`]: placement and scheduling stay unrelated).
const SLOT_SEED: u32 = HASH_SEED ^ 0x5107_5e75;

#[inline(always)]
const fn ports_word(port: u16, listener: u16) -> u32 {
    ((port as u32) << 16) | listener as u32
}

slot_type!(
    /// A slot of [`crate::HALF_OPEN_MAP`] (32 bytes).
    HalfSlot,
    ConnKey,
    HalfOpenValue,
    (),
    (),
    32,
    u32,
    |k| jhash_3words(k.client, ports_word(k.client_port, k.listener), k.proto as u32, SLOT_SEED)
);
slot_type!(
    /// A slot of [`crate::HALF_OPEN6_MAP`] (48 bytes).
    HalfSlot6,
    ConnKey6,
    HalfOpenValue,
    u32,
    (),
    48,
    u64,
    |k| jhash_3words(
        fold6(k.client),
        ports_word(k.client_port, k.listener),
        k.proto as u32,
        SLOT_SEED
    )
);
slot_type!(
    /// A slot of [`crate::PENDING_SESSION_MAP`] (32 bytes).
    PendSlot,
    SessionKey,
    SessionValue,
    (),
    u32,
    32,
    u32,
    |k| jhash_3words(k.client, k.listener as u32, 1, SLOT_SEED)
);
slot_type!(
    /// A slot of [`crate::PENDING_SESSION6_MAP`] (48 bytes).
    PendSlot6,
    SessionKey6,
    SessionValue,
    u32,
    (),
    48,
    u64,
    |k| jhash_3words(fold6(k.client), k.listener as u32, 1, SLOT_SEED)
);

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{
        sync::atomic::{AtomicBool, AtomicU32, Ordering},
        vec::Vec,
    };

    use super::*;

    /// A table in ordinary memory, with the atomics user space uses.
    struct Table {
        slots: Vec<HalfSlot>,
    }

    // SAFETY: slots are only ever touched through the protocol under test.
    unsafe impl Sync for Table {}

    impl Table {
        fn new(n: usize) -> Self {
            Self {
                slots: std::vec![HalfSlot::default(); n],
            }
        }
        fn get(&self, k: &ConnKey) -> Option<HalfOpenValue> {
            let e = find(self, k)?;
            // SAFETY: a slot of the table.
            let (seq, key, v) = unsafe { snapshot::<Self>(e.slot) }?;
            (seq & !SEQ_SET_LOCK == e.seq & !SEQ_SET_LOCK && key == *k).then_some(v)
        }
    }

    impl Mem for Table {
        type S = HalfSlot;
        fn set(&self, i: u32) -> Option<*mut HalfSlot> {
            (i < self.sets())
                .then(|| (&self.slots[(i * SLOT_WAYS) as usize] as *const HalfSlot).cast_mut())
        }
        fn sets(&self) -> u32 {
            slot_sets(self.slots.len() as u32)
        }
        unsafe fn fetch_or(p: *mut u32, v: u32) -> u32 {
            // SAFETY: an aligned `seq` of a live slot.
            unsafe { AtomicU32::from_ptr(p) }.fetch_or(v, Ordering::SeqCst)
        }
        unsafe fn fetch_add(p: *mut u32, v: u32) -> u32 {
            // SAFETY: as above.
            unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::SeqCst)
        }
    }

    fn key(client: u32, port: u16) -> ConnKey {
        ConnKey {
            client,
            client_port: port,
            listener: 1,
            proto: 6,
            _pad: [0; 3],
        }
    }

    fn val(t: u64, backend: u32) -> HalfOpenValue {
        HalfOpenValue {
            last_seen_ns: t,
            backend_isn: 0,
            backend: backend as u16,
            kind: 1,
            flags: 0,
        }
    }

    #[test]
    fn insert_find_update_remove() {
        let t = Table::new(1024);
        let k = key(7, 80);
        assert!(find(&t, &k).is_none());
        assert!(matches!(
            insert(&t, &k, &val(10, 3), 5, |_| false),
            Put::Inserted { evicted: false }
        ));
        assert_eq!(t.get(&k).map(|v| v.backend), Some(3));
        let e = find(&t, &k).unwrap();
        assert!(update::<Table>(&e, |v| v.backend_isn = 9));
        assert_eq!(t.get(&k).map(|v| v.backend_isn), Some(9));
        // `e` is stale now: a change through it is refused.
        assert!(!update::<Table>(&e, |v| v.backend_isn = 1));
        assert_eq!(t.get(&k).map(|v| v.backend_isn), Some(9));
        let e = find(&t, &k).unwrap();
        assert!(remove::<Table>(&e));
        assert!(find(&t, &k).is_none());
        // Its way is reused by the same key, not duplicated.
        insert(&t, &k, &val(11, 4), 6, |_| false);
        assert_eq!(t.get(&k).map(|v| v.backend), Some(4));
        let holding = t.slots.iter().filter(|s| s.key == k).count();
        assert_eq!(holding, 1);
        // No lock is left behind.
        assert!(
            t.slots
                .iter()
                .all(|s| s.seq & (SEQ_BUSY | SEQ_SET_LOCK) == 0)
        );
    }

    #[test]
    fn keep_returns_the_existing_entry_and_writes_nothing() {
        let t = Table::new(64);
        let k = key(1, 1);
        insert(&t, &k, &val(5, 2), 0, |_| false);
        match insert(&t, &k, &val(6, 9), 1, |v| v.backend == 2) {
            Put::Existing(e) => assert_eq!(e.val().backend, 2),
            _ => panic!("the live entry was not kept"),
        }
        assert_eq!(t.get(&k).map(|v| v.backend), Some(2));
        // `keep` refusing it: overwritten in place.
        insert(&t, &k, &val(7, 9), 2, |_| false);
        assert_eq!(t.get(&k).map(|v| v.backend), Some(9));
    }

    #[test]
    fn a_full_set_gives_up_its_oldest_way_and_says_whether_it_was_live() {
        let t = Table::new(SLOT_WAYS as usize); // one set
        for i in 0..SLOT_WAYS {
            insert(&t, &key(i, 1), &val(100 + u64::from(i), i), 50, |_| false);
        }
        // The oldest (key 0, seen at 100) goes; entries seen from 70 on are live.
        assert!(matches!(
            insert(&t, &key(99, 1), &val(120, 99), 70, |_| false),
            Put::Inserted { evicted: true }
        ));
        assert!(t.get(&key(0, 1)).is_none());
        assert!(t.get(&key(99, 1)).is_some());
        // A key already there keeps its own way.
        assert!(matches!(
            insert(&t, &key(2, 1), &val(121, 7), 71, |_| false),
            Put::Inserted { evicted: false }
        ));
        assert_eq!(t.get(&key(2, 1)).map(|v| v.backend), Some(7));
        // Next oldest (key 1, seen at 101), long dead by 950: not an eviction.
        assert!(matches!(
            insert(&t, &key(98, 1), &val(1000, 98), 950, |_| false),
            Put::Inserted { evicted: false }
        ));
        assert!(t.get(&key(1, 1)).is_none());
        assert!(
            t.slots
                .iter()
                .all(|s| s.seq & (SEQ_BUSY | SEQ_SET_LOCK) == 0)
        );
    }

    #[test]
    fn placement_spreads_keys_over_sets() {
        let sets = 4096u32;
        let mut n = std::vec![0u32; sets as usize];
        for i in 0..(sets * 4) {
            n[(HalfSlot::hash(&key(0x0a00_0000 + i, 40000)) % sets) as usize] += 1;
        }
        let max = *n.iter().max().unwrap();
        assert!(max <= 16, "a set got {max} of 4 per set on average");
    }

    #[test]
    fn concurrent_writers_never_tear_an_entry_and_one_insert_wins() {
        // Writers rewrite a few keys with values whose sequence number mirrors their time; readers
        // must only ever see matching pairs. Separately, racing "insert unless present"
        // calls for one key all end up with the first one's value.
        let t = Table::new(64);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for w in 0..3u64 {
                let t = &t;
                let stop = &stop;
                s.spawn(move || {
                    let mut i = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        let stamp = i * 4 + w;
                        let k = key((i % 5) as u32, 1);
                        let v = HalfOpenValue {
                            backend_isn: stamp as u32,
                            ..val(stamp, 0)
                        };
                        insert(t, &k, &v, u64::MAX, |_| false);
                        if let Some(e) = find(t, &k) {
                            update::<Table>(&e, |v| {
                                v.last_seen_ns += 1;
                                v.backend_isn += 1;
                            });
                        }
                        i += 1;
                    }
                });
            }
            let t = &t;
            let reader = s.spawn(move || {
                let mut seen = 0u64;
                for _ in 0..200_000 {
                    for c in 0..5u32 {
                        if let Some(v) = t.get(&key(c, 1)) {
                            assert_eq!(v.last_seen_ns as u32, v.backend_isn, "torn entry {v:?}");
                            seen += 1;
                        }
                    }
                }
                seen
            });
            let seen = reader.join().unwrap();
            stop.store(true, Ordering::Relaxed);
            assert!(seen > 0);
        });

        for round in 0..200u32 {
            let t = Table::new(64);
            let k = key(round, 9);
            let winners: Vec<u32> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..4u32)
                    .map(|b| {
                        let t = &t;
                        s.spawn(move || {
                            loop {
                                match insert(t, &k, &val(1, b), u64::MAX, |_| true) {
                                    Put::Inserted { .. } => return b,
                                    Put::Existing(e) => return u32::from(e.val().backend),
                                    Put::Busy => std::hint::spin_loop(),
                                }
                            }
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(
                winners.iter().all(|b| *b == winners[0]),
                "round {round}: {winners:?}"
            );
        }
    }
}
