//! clb datapath: an XDP L4 load balancer with flood-proof connection tracking and source-IP
//! session persistence, NAT or direct server return.
//!
//! Per packet: Ethernet/IPv4 → to a listener? (`forward`: verified flow → unverified flow →
//! new flow, scheduled by round robin, Maglev or the stateless hash in flood mode; DNAT or
//! DSR) : from a backend? (`reply`: SNAT back to the VIP) : an ICMP error about a flow?
//! (`icmp`) : pass. Everything the balancer does not own goes to the stack untouched.
//!
//! State is split by trust (docs/datapath.md has the state machine): unverified flows (a SYN,
//! a first UDP datagram, an adopted mid-stream packet) live in the small, churnable half-open
//! tables; only a completed handshake or a two-way exchange writes the connection and
//! persistence tables, so a flood of spoofed sources cannot evict real flows.
#![no_std]
#![no_main]
// `core::intrinsics::atomic_xadd` for the round-robin cursor (RUSTC_BOOTSTRAP=1 build).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only fetch-and-add on BPF"
)]

mod backends;
mod conntrack;
mod csum;
mod flood;
mod forward;
mod halfopen;
mod icmp;
mod maps;
mod nat;
mod parse;
mod persist;
mod reply;
mod rst;
mod schedule;
mod spoof;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use clb_common::{ListenerKey, PROTO_ICMP, counter};

use crate::{maps::CLB_LSN_ADDR_V1, parse::L4};

/// Final outcome of a parse step that stops processing.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// Drop, counting this `counter::DROP_*` reason.
    Drop(u32),
}

/// The load balancer.
#[xdp]
pub fn clb_xdp(ctx: XdpContext) -> u32 {
    let action = process(&ctx);
    #[cfg(feature = "debug-log")]
    if action == xdp_action::XDP_DROP || action == xdp_action::XDP_TX {
        aya_log_ebpf::debug!(&ctx, "clb: verdict {} (1 drop, 3 RST sent)", action);
    }
    stats::count(match action {
        xdp_action::XDP_PASS => counter::VERDICT_PASS,
        xdp_action::XDP_DROP => counter::VERDICT_DROP,
        xdp_action::XDP_TX => counter::VERDICT_TX,
        xdp_action::XDP_REDIRECT => counter::VERDICT_REDIRECT,
        _ => counter::VERDICT_ABORTED,
    });
    action
}

/// Passes every packet: attached to veth peers so `XDP_TX`/redirected frames are delivered,
/// and the floor the benchmarks measure against.
#[xdp]
pub fn clb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop(reason: u32) -> u32 {
    stats::count(reason);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn process(ctx: &XdpContext) -> u32 {
    let Some(ip) = parse::ipv4(ctx) else {
        return xdp_action::XDP_PASS;
    };
    match parse::l4_lenient(ctx, ip) {
        // Fast path, a well-formed TCP/UDP packet: one lookup says whether it is for a
        // listener; otherwise it may be a backend's reply (or a VIP port without listener,
        // which the reply path passes on too).
        Some(p) => {
            let key = ListenerKey {
                vip: p.daddr,
                port: p.dport,
                proto: p.proto,
                _pad: 0,
            };
            // SAFETY: read-only use of a map value.
            match unsafe { CLB_LSN_ADDR_V1.get(&key) } {
                Some(l) => forward::client_packet(ctx, ip, &p, l.id),
                None => reply::backend_packet(ctx, ip, &p),
            }
        }
        // Anything else: if it is addressed to a VIP, say why it is not balanced (malformed
        // → dropped with a reason; an ICMP error about a flow → to its backend; another
        // protocol → passed); otherwise not ours.
        None => {
            // SAFETY: `parse::ipv4` bounds-checked a full IPv4 header.
            let daddr = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
            let marker = ListenerKey {
                vip: daddr,
                port: 0,
                proto: 0,
                _pad: 0,
            };
            // SAFETY: read-only use of a map value.
            if unsafe { CLB_LSN_ADDR_V1.get(&marker) }.is_none() {
                return xdp_action::XDP_PASS;
            }
            match parse::l4_strict(ctx, ip) {
                Ok(L4::Packet) => xdp_action::XDP_PASS,
                Ok(L4::Other(PROTO_ICMP)) => icmp::to_vip(ctx, ip),
                Ok(L4::Other(_)) => xdp_action::XDP_PASS,
                Err(Verdict::Drop(reason)) => drop(reason),
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: `bpf_fib_lookup` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
