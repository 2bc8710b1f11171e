//! Source-IP session persistence: within `persist` seconds of a client's last packet, its new
//! flows go to the backend its entry names, as long as that backend still accepts new
//! connections (present, weight > 0, healthy); otherwise the client is scheduled afresh.
//!
//! Two tables: the persistence table holds clients with a verified flow (written only by a
//! promotion, so a flood of spoofed sources cannot evict them); the pending table holds the
//! choice made for a client whose flows are all unverified yet, so the parallel SYNs a browser
//! opens land on one backend. Both are keyed by the client address masked by the listener's
//! persistence mask (`--persist-mask`), so a prefix shares one entry.

use clb_common::{ListenerInfo, REFRESH_NS, SessionValue, is_expired};

use crate::{backends, family::Family, stats};

/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;
/// `BPF_ANY`.
const BPF_ANY: u64 = 0;

/// The persistence key of `client` on listener `id`.
#[inline(always)]
pub fn key<F: Family>(lsn: &ListenerInfo, client: F::Addr, id: u32) -> F::SKey {
    F::skey(F::masked(client, lsn, id), id)
}

/// The backend of a live entry `s`, refreshing it, if it accepts new connections (or, with
/// `any_present`, if it is configured at all: for packets of flows already under way).
#[inline(always)]
fn live_in(
    s: Option<*mut SessionValue>,
    lsn: &ListenerInfo,
    now: u64,
    any_present: bool,
) -> Option<u32> {
    // SAFETY: map value pointer; concurrent writers only move `last_seen_ns` forward.
    let s = unsafe { &mut *s? };
    if is_expired(now, s.last_seen_ns, lsn.persist_ns) {
        return None;
    }
    let usable = if any_present {
        backends::present(s.backend).is_some()
    } else {
        backends::accepting(s.backend)
    };
    if !usable {
        return None;
    }
    if now >= s.last_seen_ns + REFRESH_NS {
        s.last_seen_ns = now;
    }
    Some(s.backend)
}

/// The client's persisted backend: its verified entry, else its pending one.
#[inline(always)]
pub fn lookup<F: Family>(
    k: &F::SKey,
    lsn: &ListenerInfo,
    now: u64,
    any_present: bool,
) -> Option<u32> {
    if let Some(b) = live_in(F::sess(k), lsn, now, any_present) {
        return Some(b);
    }
    live_in(F::psess(k), lsn, now, any_present)
}

/// Records `backend` as the pending choice of a client with no entry yet. If another CPU
/// wrote one meanwhile, its choice wins (both flows land on one backend): returns the backend
/// to use.
#[inline(always)]
pub fn remember_pending<F: Family>(k: &F::SKey, backend: u32, now: u64) -> u32 {
    let v = SessionValue {
        last_seen_ns: now,
        backend,
        _pad: 0,
    };
    if !F::psess_insert(k, &v, BPF_NOEXIST) {
        match F::psess(k) {
            // SAFETY: map value pointer.
            Some(s) if backends::accepting(unsafe { (*s).backend }) => {
                // SAFETY: as above.
                return unsafe { (*s).backend };
            }
            // Expired or its backend stopped accepting: replace it.
            _ => {
                let _replaced = F::psess_insert(k, &v, BPF_ANY);
            }
        }
    }
    backend
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
