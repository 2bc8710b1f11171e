//! Source-IP session persistence: within `persist` seconds of a client's last packet, its new
//! flows go to the backend its entry names, as long as that backend still accepts new
//! connections (present, weight > 0, healthy); otherwise the client is scheduled afresh.
//!
//! Two tables: the persistence table holds clients with a verified flow (written only by a
//! promotion, so a flood of spoofed sources cannot evict them); the pending table holds the
//! choice made for a client whose flows are all unverified yet, so the parallel SYNs a browser
//! opens land on one backend (an in-place table, `clb_common::slots`: a new client's SYN writes
//! it without a map-update call). Both are keyed by the client address masked by the
//! listener's persistence mask (`--persist-mask`), so a prefix shares one entry.

use clb_common::{ListenerInfo, REFRESH_NS, SessionValue, counter, is_expired, slots};

use crate::{
    backends,
    family::Family,
    slots::{Placed, Table},
    stats,
};

/// The persistence key of `client` on listener `id`.
#[inline(always)]
pub fn key<F: Family>(lsn: &ListenerInfo, client: F::Addr, id: u32) -> F::SKey {
    F::skey(F::masked(client, lsn, id), id)
}

/// Whether entry `v` is live and its backend usable: accepting new connections or, with
/// `any_present`, configured at all (for packets of flows already under way).
#[inline(always)]
fn usable(v: &SessionValue, lsn: &ListenerInfo, now: u64, any_present: bool) -> bool {
    if is_expired(now, v.last_seen_ns, lsn.persist_ns) {
        return false;
    }
    if any_present {
        backends::present(v.backend).is_some()
    } else {
        backends::accepting(v.backend)
    }
}

/// The backend of the verified entry `s` if usable, refreshing it.
#[inline(always)]
fn verified(
    s: Option<*mut SessionValue>,
    lsn: &ListenerInfo,
    now: u64,
    any_present: bool,
) -> Option<u32> {
    // SAFETY: map value pointer; concurrent writers only move `last_seen_ns` forward.
    let s = unsafe { &mut *s? };
    if !usable(s, lsn, now, any_present) {
        return None;
    }
    if now >= s.last_seen_ns + REFRESH_NS {
        s.last_seen_ns = now;
    }
    Some(s.backend)
}

/// The backend of the client's pending entry if usable, refreshing it.
#[inline(always)]
fn pending<F: Family>(k: &F::SKey, lsn: &ListenerInfo, now: u64, any_present: bool) -> Option<u32> {
    let e = <F::Pend as Table>::find(k)?;
    let v = e.val();
    if !usable(v, lsn, now, any_present) {
        return None;
    }
    let backend = v.backend;
    if now >= v.last_seen_ns + REFRESH_NS {
        slots::update::<F::Pend>(&e, |v| v.last_seen_ns = now);
    }
    Some(backend)
}

/// The client's persisted backend: its verified entry, else its pending one.
#[inline(always)]
pub fn lookup<F: Family>(
    k: &F::SKey,
    lsn: &ListenerInfo,
    now: u64,
    any_present: bool,
) -> Option<u32> {
    if let Some(b) = verified(F::sess(k), lsn, now, any_present) {
        return Some(b);
    }
    pending::<F>(k, lsn, now, any_present)
}

/// Records `backend` as the pending choice of a client without a usable entry. If another
/// CPU wrote a usable one meanwhile, its choice wins (both flows land on one backend): returns
/// the backend to use; `None` if other CPUs kept the entry's set busy, so nothing remembers
/// the choice. An entry pushed out that was seen within `live_ns` is counted.
#[inline(always)]
pub fn remember_pending<F: Family>(
    k: &F::SKey,
    lsn: &ListenerInfo,
    backend: u32,
    now: u64,
    live_ns: u64,
) -> Option<u32> {
    let v = SessionValue {
        last_seen_ns: now,
        backend,
        _pad: 0,
    };
    let stored = |evicted: bool| {
        if evicted {
            stats::count(counter::PENDING_EVICTED);
        }
        Some(backend)
    };
    match F::Pend::put(k, &v, now, live_ns, lsn.persist_ns) {
        Placed::Existing(b) if backends::accepting(b) => Some(b),
        // Its backend stopped accepting: this choice replaces it.
        Placed::Existing(_) => match F::Pend::put(k, &v, now, live_ns, 0) {
            Placed::Stored { evicted } => stored(evicted),
            _ => None,
        },
        Placed::Stored { evicted } => stored(evicted),
        Placed::Busy => None,
    }
}

/// Commits `backend` as the client's persisted backend (a flow of it was verified).
#[inline(always)]
pub fn commit<F: Family>(k: &F::SKey, lsn: &ListenerInfo, listener: u32, backend: u32, now: u64) {
    if let Some(s) = F::sess(k) {
        // SAFETY: as above.
        let s = unsafe { &mut *s };
        if s.backend == backend && !is_expired(now, s.last_seen_ns, lsn.persist_ns) {
            if now >= s.last_seen_ns + REFRESH_NS {
                s.last_seen_ns = now;
            }
            return;
        }
    }
    let v = SessionValue {
        last_seen_ns: now,
        backend,
        _pad: 0,
    };
    if F::sess_insert(k, &v) {
        stats::both(listener, backend, |c| c.session_new += 1);
    }
}

/// Refreshes the client's verified entry from a packet of a verified flow it governs.
#[inline(always)]
pub fn touch<F: Family>(k: &F::SKey, lsn: &ListenerInfo, backend: u32, now: u64) {
    if let Some(s) = F::sess(k) {
        // SAFETY: as above.
        let s = unsafe { &mut *s };
        if s.backend == backend && !is_expired(now, s.last_seen_ns, lsn.persist_ns) {
            s.last_seen_ns = now;
        }
    }
}
