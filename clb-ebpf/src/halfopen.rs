//! The half-open table: unverified flows. A TCP SYN, a first UDP datagram and an adopted
//! mid-stream packet create state only here, an in-place table (`clb_common::slots`) that a
//! flood may churn without touching the connection table. What the SYN decided holds for the
//! whole handshake (retransmitted SYNs find the entry); when a flood evicts it, the stateless
//! hash recomputes the same choice (see `forward::stateless_backend`).
//!
//! An entry is found under the table's sequence lock and read in place ([`Half`]); every
//! change goes through the lock again and is skipped if another CPU changed the slot in
//! between (a lost refresh or packet count only: the next packet writes it).

use clb_common::{
    HALF_F_REPLIED, HalfOpenValue, REFRESH_NS, counter, is_expired,
    slots::{self, Entry, Mem},
};

use crate::{
    family::Family,
    flood,
    maps::CLB_GLOBAL_V1,
    slots::{Placed, Table},
    stats,
};

/// A live half-open entry as read, with the handle to change it.
pub type Half<F> = Entry<<<F as Family>::Half as Mem>::S>;

/// The half-open timeout in effect, ns.
#[inline(always)]
pub fn timeout_ns() -> u64 {
    match CLB_GLOBAL_V1.get(0) {
        Some(g) if g.half_open_timeout_ns != 0 => g.half_open_timeout_ns,
        _ => u64::from(clb_common::HALF_OPEN_TIMEOUT_SECS) * clb_common::NS_PER_SEC,
    }
}

/// The live half-open entry of `key`.
#[inline(always)]
pub fn live<F: Family>(key: &F::Key, now: u64) -> Option<Half<F>> {
    let h = F::Half::find(key)?;
    if is_expired(now, h.val().last_seen_ns, timeout_ns()) {
        return None;
    }
    Some(h)
}

/// Refreshes an entry's timestamp (at most every `REFRESH_NS`).
#[inline(always)]
pub fn touch<F: Family>(h: &Half<F>, now: u64) {
    if now >= h.val().last_seen_ns + REFRESH_NS {
        slots::update::<F::Half>(h, |v| v.last_seen_ns = now);
    }
}

/// Notes a client packet of an unverified flow: refreshes it (at most every `REFRESH_NS`) and
/// sets `flags`.
#[inline(always)]
pub fn note_packet<F: Family>(h: &Half<F>, now: u64, flags: u8) {
    let v = h.val();
    if now >= v.last_seen_ns + REFRESH_NS || v.flags & flags != flags {
        slots::update::<F::Half>(h, |v| {
            v.flags |= flags;
            if now >= v.last_seen_ns + REFRESH_NS {
                v.last_seen_ns = now;
            }
        });
    }
}

/// Records a backend's SYN-ACK on a SYN entry: its initial sequence number, which the client's
/// handshake-completing ACK must acknowledge. A retransmitted SYN-ACK carries the same number;
/// a new one (the client's port reused) replaces it.
#[inline(always)]
pub fn note_syn_ack<F: Family>(h: &Half<F>, isn: u32) {
    let v = h.val();
    if v.flags & HALF_F_REPLIED == 0 || v.backend_isn != isn {
        slots::update::<F::Half>(h, |v| {
            v.flags |= HALF_F_REPLIED;
            v.backend_isn = isn;
        });
    }
}

/// Marks a UDP flow answered by its backend (its next client packet promotes it).
#[inline(always)]
pub fn note_reply<F: Family>(h: &Half<F>) {
    if h.val().flags & HALF_F_REPLIED == 0 {
        slots::update::<F::Half>(h, |v| v.flags |= HALF_F_REPLIED);
    }
}

/// Records a new unverified flow of `kind` on `backend` (over any entry of the same key, else
/// in an empty way, else over its set's oldest entry). Pushing out a live entry means the
/// table churns: flood mode goes on. Returns false, with flood mode on, if other CPUs kept
/// the set busy: the caller then places the flow by the stateless hash, which its next packets
/// recompute.
#[inline(always)]
pub fn insert<F: Family>(key: &F::Key, backend: u32, kind: u8, flags: u8, now: u64) -> bool {
    let v = HalfOpenValue {
        last_seen_ns: now,
        backend_isn: 0,
        // Backend ids are below `MAX_BACKENDS` (2^16).
        backend: backend as u16,
        kind,
        flags,
    };
    match F::Half::put(key, &v, now, timeout_ns(), 0) {
        Placed::Stored { evicted } => {
            stats::count(counter::HALF_OPEN_INSERT);
            if evicted {
                stats::count(counter::HALF_OPEN_EVICTED);
                flood::enter(now);
            }
            true
        }
        Placed::Existing(_) => true,
        Placed::Busy => {
            stats::count(counter::SLOT_BUSY);
            flood::enter(now);
            false
        }
    }
}

/// Forgets an unverified flow (promoted, or its client reset it). Absent already (evicted,
/// or another CPU promoted it): nothing to do.
#[inline(always)]
pub fn remove<F: Family>(h: &Half<F>) {
    slots::remove::<F::Half>(h);
}
