//! Connection table: a flow stays on its backend for its whole life, persistence or not.
//!
//! Expiry is checked on every lookup (an expired entry counts as absent: the kernel never
//! relies on the user-space sweeper for correctness, only for memory). `last_seen` is written
//! at most every `REFRESH_NS` per entry; `clb_common::is_expired` adds that much slack.

use clb_common::{
    CONN_FIN, CONN_OPEN, CONN_RST, ConnKey, ConnValue, ListenerInfo, REFRESH_NS, conn_timeout_ns,
    is_expired,
};

use crate::{
    backends,
    maps::CLB_CONN_V1,
    parse::{Pkt, TCP_FIN, TCP_RST},
};

/// A live connection entry for `key`, or `None` when absent or expired.
#[inline(always)]
pub fn live(key: &ConnKey, lsn: &ListenerInfo, now: u64) -> Option<&'static mut ConnValue> {
    let c = CLB_CONN_V1.get_ptr_mut(key)?;
    // SAFETY: a map value pointer; other CPUs may write `last_seen_ns`/`state` concurrently,
    // which only ever makes an entry look a little older or newer.
    let c = unsafe { &mut *c };
    if is_expired(
        now,
        c.last_seen_ns,
        conn_timeout_ns(c.state, lsn.idle_timeout_ns),
    ) {
        return None;
    }
    Some(c)
}

/// Looks up the client → VIP packet `p`'s connection. `Some(backend)` to forward on the
/// established flow; `None` when the packet must be treated as a new flow: no live entry,
/// the backend was removed, or a SYN reuses the ports of a closed connection.
#[inline(always)]
pub fn forward(key: &ConnKey, lsn: &ListenerInfo, p: &Pkt, now: u64) -> Option<(u32, bool)> {
    let c = live(key, lsn, now)?;
    if p.is_tcp() && p.is_syn() && c.state != CONN_OPEN {
        return None;
    }
    backends::present(c.backend)?;
    let refreshed = track(c, p, now);
    Some((c.backend, refreshed))
}

/// Follows TCP teardown (FIN, RST seen in either direction) and refreshes `last_seen`.
/// Returns whether `last_seen` was written (the caller piggybacks the session refresh on it).
#[inline(always)]
pub fn track(c: &mut ConnValue, p: &Pkt, now: u64) -> bool {
    if p.is_tcp() {
        if p.tcp_flags & TCP_RST != 0 {
            if c.state != CONN_RST {
                c.state = CONN_RST;
            }
        } else if p.tcp_flags & TCP_FIN != 0 && c.state == CONN_OPEN {
            c.state = CONN_FIN;
        }
    }
    if now >= c.last_seen_ns + REFRESH_NS {
        c.last_seen_ns = now;
        return true;
    }
    false
}

/// State a new entry starts in, from the packet that creates it.
#[inline(always)]
pub fn initial_state(p: &Pkt) -> u8 {
    if p.is_tcp() && p.tcp_flags & TCP_RST != 0 {
        CONN_RST
    } else if p.is_tcp() && p.tcp_flags & TCP_FIN != 0 {
        CONN_FIN
    } else {
        CONN_OPEN
    }
}

/// Creates the entry for a new flow on `backend`.
#[inline(always)]
pub fn insert(key: &ConnKey, backend: u32, p: &Pkt, now: u64) -> Result<(), ()> {
    let v = ConnValue {
        last_seen_ns: now,
        backend,
        state: initial_state(p),
        _pad: [0; 3],
    };
    CLB_CONN_V1.insert(key, &v, 0).map_err(|_| ())
}
