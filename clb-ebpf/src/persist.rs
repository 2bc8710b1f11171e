//! Source-IP session persistence: within `persist` seconds of a client's last packet, its new
//! flows go to the backend its entry names, as long as that backend still accepts new
//! connections (present, weight > 0, healthy); otherwise the client is scheduled afresh.
//!
//! Two tables: the persistence table holds clients with a verified flow (written only by a
//! promotion, so a flood of spoofed sources cannot evict them); the pending table holds the
//! choice made for a client whose flows are all unverified yet, so the parallel SYNs a browser
//! opens land on one backend. Both are keyed by the client address masked by the listener's
//! persistence mask (`--persist-mask`), so a prefix shares one entry.

use aya_ebpf::btf_maps::LruHashMap;
use clb_common::{ListenerInfo, REFRESH_NS, SessionKey, SessionValue, is_expired};

use crate::{
    backends,
    maps::{CLB_PSESS_V1, CLB_SESS_V2},
    stats,
};

/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;

type Table<const N: usize, const F: usize> = LruHashMap<SessionKey, SessionValue, N, F>;

/// The persistence key of `client` on `listener`.
#[inline(always)]
pub fn key(lsn: &ListenerInfo, client: u32, listener: u32) -> SessionKey {
    SessionKey {
        client: client & lsn.client_mask,
        listener: listener as u16,
        _pad: 0,
    }
}

/// The backend of a live entry in `table`, refreshing it, if it accepts new connections (or,
/// with `any_present`, if it is configured at all: for packets of flows already under way).
#[inline(always)]
fn live_in<const N: usize, const F: usize>(
    table: &Table<N, F>,
    k: &SessionKey,
    lsn: &ListenerInfo,
    now: u64,
    any_present: bool,
) -> Option<u32> {
    let s = table.get_ptr_mut(k)?;
    // SAFETY: map value pointer; concurrent writers only move `last_seen_ns` forward.
    let s = unsafe { &mut *s };
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
pub fn lookup(k: &SessionKey, lsn: &ListenerInfo, now: u64, any_present: bool) -> Option<u32> {
    if let Some(b) = live_in(&CLB_SESS_V2, k, lsn, now, any_present) {
        return Some(b);
    }
    live_in(&CLB_PSESS_V1, k, lsn, now, any_present)
}

/// Records `backend` as the pending choice of a client with no entry yet. If another CPU
/// wrote one meanwhile, its choice wins (both flows land on one backend): returns the backend
/// to use.
#[inline(always)]
pub fn remember_pending(k: &SessionKey, backend: u32, now: u64) -> u32 {
    let v = SessionValue {
        last_seen_ns: now,
        backend,
        _pad: 0,
    };
    if CLB_PSESS_V1.insert(k, &v, BPF_NOEXIST).is_err() {
        match CLB_PSESS_V1.get_ptr(k) {
            // SAFETY: map value pointer.
            Some(s) if backends::accepting(unsafe { (*s).backend }) => {
                // SAFETY: as above.
                return unsafe { (*s).backend };
            }
            // Expired or its backend stopped accepting: replace it.
            _ => {
                let _replaced = CLB_PSESS_V1.insert(k, &v, 0).is_ok();
            }
        }
    }
    backend
}

/// Commits `backend` as the client's persisted backend (a flow of it was verified).
#[inline(always)]
pub fn commit(k: &SessionKey, lsn: &ListenerInfo, listener: u32, backend: u32, now: u64) {
    if let Some(s) = CLB_SESS_V2.get_ptr_mut(k) {
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
    if CLB_SESS_V2.insert(k, &v, 0).is_ok() {
        stats::both(listener, backend, |c| c.session_new += 1);
    }
}

/// Refreshes the client's verified entry from a packet of a verified flow it governs.
#[inline(always)]
pub fn touch(k: &SessionKey, lsn: &ListenerInfo, backend: u32, now: u64) {
    if let Some(s) = CLB_SESS_V2.get_ptr_mut(k) {
        // SAFETY: as above.
        let s = unsafe { &mut *s };
        if s.backend == backend && !is_expired(now, s.last_seen_ns, lsn.persist_ns) {
            s.last_seen_ns = now;
        }
    }
}
