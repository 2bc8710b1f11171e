//! The connection table: verified flows. A flow stays on its backend for its whole life,
//! persistence or not. Only [`promote`] writes new entries (a completed handshake, a two-way
//! UDP exchange, an adopted flow its backend answered), so a flood of new sources never
//! evicts them.
//!
//! Expiry is checked on every lookup (an expired entry counts as absent: the kernel never
//! relies on the user-space sweeper for correctness, only for memory). `last_seen` is written
//! at most every `REFRESH_NS` per entry; `clb_common::is_expired` adds that much slack.
//!
//! RST rule: an RST (from either end, possibly spoofed: it is not checked against the
//! sequence window) moves the flow to `CONN_RST`, whose timeout is short; normal packets from
//! both ends afterwards (from the client alone on DSR listeners, whose replies clb never
//! sees) bring it back, so a blind spoofed RST cannot cut a live connection short.
//!
//! Active connections: every change into or out of `CONN_OPEN` here is counted on the
//! entry's backend ([`load`]), for least connections and `backend ls`.

use clb_common::{
    CONN_F_FIN_BEFORE, CONN_F_SEEN_FWD, CONN_F_SEEN_REV, CONN_FIN, CONN_OPEN, CONN_RST, ConnValue,
    ListenerInfo, REFRESH_NS, conn_timeout_ns, is_expired,
};

use crate::{
    family::Family,
    load,
    parse::{Pkt, TCP_FIN},
};

/// Which end sent a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client → backend.
    Fwd,
    /// Backend → client.
    Rev,
}

/// A live connection entry for `key`, or `None` when absent or expired.
#[inline(always)]
pub fn live<F: Family>(
    key: &F::Key,
    lsn: &ListenerInfo,
    now: u64,
) -> Option<&'static mut ConnValue> {
    let c = F::conn(key)?;
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

/// Follows TCP teardown and the RST rule for a packet in direction `dir`, and refreshes
/// `last_seen`. `both_ends`: whether recovery from an RST needs normal packets from both ends
/// (NAT) or the client alone suffices (DSR). Returns whether `last_seen` was written (the
/// caller piggybacks the session refresh on it).
#[inline(always)]
pub fn track<F: Family>(
    c: &mut ConnValue,
    p: &Pkt<F>,
    now: u64,
    dir: Dir,
    both_ends: bool,
) -> bool {
    if p.is_tcp() {
        if p.is_rst() {
            if c.state != CONN_RST {
                if c.state == CONN_OPEN {
                    load::closed(c.backend);
                }
                c.flags = if c.state == CONN_FIN {
                    CONN_F_FIN_BEFORE
                } else {
                    0
                };
                c.state = CONN_RST;
            }
        } else {
            if c.state == CONN_RST {
                let seen = c.flags
                    | match dir {
                        Dir::Fwd => CONN_F_SEEN_FWD,
                        Dir::Rev => CONN_F_SEEN_REV,
                    };
                let back = if both_ends {
                    seen & (CONN_F_SEEN_FWD | CONN_F_SEEN_REV) == CONN_F_SEEN_FWD | CONN_F_SEEN_REV
                } else {
                    seen & CONN_F_SEEN_FWD != 0
                };
                if back {
                    c.state = if seen & CONN_F_FIN_BEFORE != 0 {
                        CONN_FIN
                    } else {
                        load::opened(c.backend);
                        CONN_OPEN
                    };
                    c.flags = 0;
                } else if seen != c.flags {
                    c.flags = seen;
                }
            }
            if p.tcp_flags & TCP_FIN != 0 && c.state == CONN_OPEN {
                c.state = CONN_FIN;
                load::closed(c.backend);
            }
        }
    }
    if now >= c.last_seen_ns + REFRESH_NS {
        c.last_seen_ns = now;
        return true;
    }
    false
}

/// Writes the verified entry of a flow on `backend` (replacing any stale one).
#[inline(always)]
pub fn insert<F: Family>(key: &F::Key, backend: u32, p: &Pkt<F>, now: u64) -> Result<(), ()> {
    let state = if p.is_tcp() && p.tcp_flags & TCP_FIN != 0 {
        CONN_FIN
    } else {
        CONN_OPEN
    };
    let v = ConnValue {
        last_seen_ns: now,
        backend,
        state,
        flags: 0,
        _pad: [0; 2],
    };
    if F::conn_insert(key, &v) {
        if state == CONN_OPEN {
            load::opened(backend);
        }
        Ok(())
    } else {
        Err(())
    }
}
