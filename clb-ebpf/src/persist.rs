//! Source-IP session persistence: within `persist` seconds of a client's last packet, its new
//! connections go to the backend its entry names, as long as that backend still accepts new
//! connections (present, weight > 0, healthy); otherwise the client is scheduled afresh.

use clb_common::{ListenerInfo, REFRESH_NS, SessionKey, SessionValue, is_expired};

use crate::{backends, maps::CLB_SESS_V1, schedule, stats};

/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn key(client: u32, listener: u32) -> SessionKey {
    SessionKey {
        client,
        listener: listener as u16,
        _pad: 0,
    }
}

/// The backend of `client`'s live persistence entry, refreshing it, if it still accepts new
/// connections (or, with `any_present`, if it is still configured at all: used for mid-stream
/// packets of a flow the connection table lost, which belong where the client was).
#[inline(always)]
pub fn live_backend(
    listener: u32,
    lsn: &ListenerInfo,
    client: u32,
    now: u64,
    any_present: bool,
) -> Option<u32> {
    let s = CLB_SESS_V1.get_ptr_mut(&key(client, listener))?;
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

/// Picks the backend of a new flow of `client` on a listener with persistence on: its live
/// entry's backend, or a freshly scheduled one that is then written as its entry.
#[inline(always)]
pub fn pick(listener: u32, lsn: &ListenerInfo, client: u32, now: u64) -> Result<u32, u32> {
    let k = key(client, listener);
    let existed = match CLB_SESS_V1.get_ptr_mut(&k) {
        Some(s) => {
            // SAFETY: as above.
            let s = unsafe { &mut *s };
            if !is_expired(now, s.last_seen_ns, lsn.persist_ns) && backends::accepting(s.backend) {
                if now >= s.last_seen_ns + REFRESH_NS {
                    s.last_seen_ns = now;
                }
                let b = s.backend;
                stats::both(listener, b, |c| c.session_hits += 1);
                return Ok(b);
            }
            true
        }
        None => false,
    };
    let b = schedule::pick(listener, lsn)?;
    let v = SessionValue {
        last_seen_ns: now,
        backend: b,
        _pad: 0,
    };
    if existed {
        // Expired, or its backend stopped accepting: reschedule the client.
        if CLB_SESS_V1.insert(&k, &v, 0).is_err() {
            return Ok(b);
        }
    } else if CLB_SESS_V1.insert(&k, &v, BPF_NOEXIST).is_err() {
        // Another CPU wrote this client's entry between our lookup and insert: follow it, so
        // both new connections land on one backend.
        if let Some(s) = CLB_SESS_V1.get_ptr(&k) {
            // SAFETY: map value pointer.
            return Ok(unsafe { (*s).backend });
        }
        return Ok(b);
    }
    stats::both(listener, b, |c| c.session_new += 1);
    Ok(b)
}

/// Refreshes `client`'s entry from a packet of an established flow it governs (same backend).
#[inline(always)]
pub fn touch(listener: u32, lsn: &ListenerInfo, client: u32, backend: u32, now: u64) {
    if let Some(s) = CLB_SESS_V1.get_ptr_mut(&key(client, listener)) {
        // SAFETY: as above.
        let s = unsafe { &mut *s };
        if s.backend == backend && !is_expired(now, s.last_seen_ns, lsn.persist_ns) {
            s.last_seen_ns = now;
        }
    }
}
