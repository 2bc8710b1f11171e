//! Flood mode and the RST budget.
//!
//! Each CPU counts the new unverified flows it sees per `FLOOD_WINDOW_NS`; above the
//! threshold user space set (derived from the half-open table's size: the rate at which its
//! entries would be evicted before a handshake completes) it switches flood mode on for all
//! CPUs until `FLOOD_HOLD_NS` after the last window over it; a new flow that finds its
//! half-open set full switches it on too. In flood mode new flows are placed by the stateless
//! hash (TCP SYNs write nothing); their next packets and replies recompute the same backend.
//! The shared word is written at most once per window per CPU during a flood, never otherwise.

use clb_common::{
    CpuState, FLOOD_HOLD_NS, FLOOD_WINDOW_NS, NS_PER_SEC, RST_TOKEN_SCALE, SharedState, counter,
    flood_recent,
};

use crate::{
    maps::{CLB_CPU_V1, CLB_GLOBAL_V1, CLB_SHARED_V1},
    stats,
};

#[inline(always)]
fn cpu() -> Option<&'static mut CpuState> {
    // SAFETY: this CPU's slot; nothing else writes it while the program runs here.
    CLB_CPU_V1.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn shared() -> Option<&'static mut SharedState> {
    // SAFETY: a map value; a racing write only ever moves `flood_until_ns` to a similar time.
    CLB_SHARED_V1.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Counts a new unverified flow; returns whether flood mode is on now.
#[inline(always)]
pub fn note_new_flow(now: u64) -> bool {
    let threshold = match CLB_GLOBAL_V1.get(0) {
        Some(g) => u64::from(g.flood_threshold),
        None => 0,
    };
    let (Some(c), Some(s)) = (cpu(), shared()) else {
        return false;
    };
    if now >= c.window_start_ns + FLOOD_WINDOW_NS {
        c.window_start_ns = now;
        c.window_new = 0;
    }
    c.window_new += 1;
    if threshold != 0 && c.window_new > threshold {
        hold(s, now);
    }
    now < s.flood_until_ns
}

/// Switches flood mode on (or keeps it on) from `now`: a new flow found no room for its
/// state, so it and the flows after it are placed where their next packets can recompute.
#[inline(always)]
pub fn enter(now: u64) {
    if let Some(s) = shared() {
        hold(s, now);
    }
}

/// Flood mode until `FLOOD_HOLD_NS` after `now` (the shared word is written at most once
/// per window).
#[inline(always)]
fn hold(s: &mut SharedState, now: u64) {
    let until = now + FLOOD_HOLD_NS;
    if s.flood_until_ns <= now {
        stats::count(counter::FLOOD_ENTERED);
        s.flood_until_ns = until;
    } else if until >= s.flood_until_ns + FLOOD_WINDOW_NS {
        s.flood_until_ns = until;
    }
}

/// Whether flows may be resolved by the stateless hash now (flood mode, or its grace).
#[inline(always)]
pub fn recent(now: u64) -> bool {
    match CLB_SHARED_V1.get(0) {
        Some(s) => flood_recent(s, now),
        None => false,
    }
}

/// Takes one RST from this CPU's budget; `false` when it is spent.
#[inline(always)]
pub fn take_rst(now: u64) -> bool {
    let rate = match CLB_GLOBAL_V1.get(0) {
        Some(g) if g.rst_per_sec != 0 => u64::from(g.rst_per_sec),
        _ => u64::from(clb_common::DEFAULT_RST_PER_SEC),
    };
    let Some(c) = cpu() else {
        return false;
    };
    let cap = rate * RST_TOKEN_SCALE;
    let elapsed = now.saturating_sub(c.rst_refill_ns).min(NS_PER_SEC);
    // tokens per ns = rate * SCALE / 1e9 = rate / 1000 (SCALE = 1e6).
    let mut tokens = c.rst_tokens + elapsed * rate / 1000;
    if tokens > cap {
        tokens = cap;
    }
    c.rst_refill_ns = now;
    if tokens < RST_TOKEN_SCALE {
        c.rst_tokens = tokens;
        return false;
    }
    c.rst_tokens = tokens - RST_TOKEN_SCALE;
    true
}
