//! The half-open table: unverified flows. A TCP SYN, a first UDP datagram and an adopted
//! mid-stream packet create state only here; a small LRU table that a flood may churn without
//! touching the connection table. What the SYN decided holds for the whole handshake
//! (retransmitted SYNs find the entry); when a flood evicts it, the stateless hash recomputes
//! the same choice (see `forward::stateless_backend`).

use clb_common::{HalfOpenValue, REFRESH_NS, counter, is_expired};

use crate::{family::Family, maps::CLB_GLOBAL_V1, stats};

/// The half-open timeout in effect, ns.
#[inline(always)]
fn timeout_ns() -> u64 {
    match CLB_GLOBAL_V1.get(0) {
        Some(g) if g.half_open_timeout_ns != 0 => g.half_open_timeout_ns,
        _ => u64::from(clb_common::HALF_OPEN_TIMEOUT_SECS) * clb_common::NS_PER_SEC,
    }
}

/// A live half-open entry for `key`.
#[inline(always)]
pub fn live<F: Family>(key: &F::Key, now: u64) -> Option<&'static mut HalfOpenValue> {
    let h = F::half(key)?;
    // SAFETY: a map value pointer; concurrent writers only touch timestamps and flag bits.
    let h = unsafe { &mut *h };
    if is_expired(now, h.last_seen_ns, timeout_ns()) {
        return None;
    }
    Some(h)
}

/// Refreshes an entry's timestamp (at most every `REFRESH_NS`).
#[inline(always)]
pub fn touch(h: &mut HalfOpenValue, now: u64) {
    if now >= h.last_seen_ns + REFRESH_NS {
        h.last_seen_ns = now;
    }
}

/// Records a new unverified flow of `kind` on `backend`.
#[inline(always)]
pub fn insert<F: Family>(key: &F::Key, backend: u32, kind: u8, flags: u8, now: u64) {
    let v = HalfOpenValue {
        last_seen_ns: now,
        backend,
        kind,
        flags,
        packets: 1,
        _pad: 0,
    };
    if F::half_insert(key, &v) {
        stats::count(counter::HALF_OPEN_INSERT);
    }
}

/// Forgets an unverified flow (promoted, or its client reset it).
#[inline(always)]
pub fn remove<F: Family>(key: &F::Key) {
    F::half_remove(key);
}
