//! clb datapath: an XDP L4 load balancer with flood-proof connection tracking and source-IP
//! session persistence, NAT or direct server return.
//!
//! Per packet: Ethernet/IPv4 or IPv6 → to a listener? (`forward`: verified flow → unverified flow →
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
mod family;
mod flood;
mod forward;
mod frag;
mod halfopen;
mod icmp;
mod icmp6;
mod ipv4;
mod ipv6;
mod load;
mod maps;
mod nat;
mod nat6;
mod parse;
mod parse6;
mod persist;
mod reply;
mod rst;
mod schedule;
mod slots;
mod spoof;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use clb_common::{
    ListenerKey, ListenerKey6, PROTO_ICMP, TAIL_V6, TAIL_V6_FRAG, TAIL_V6_ICMP, counter,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    family::{V4, V6},
    maps::{CLB_LSN_ADDR_V1, CLB_LSN_ADDR6_V1, CLB_PROGS_V1},
    parse::{L4, Pkt},
    parse6::Parsed6,
};

/// Final outcome of a parse step that stops processing.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// Drop, counting this `counter::DROP_*` reason.
    Drop(u32),
}

/// The load balancer. IPv4 is handled here; IPv6 in [`clb_xdp6`] (a tail call: its 16-byte
/// addresses need a stack frame of their own).
#[xdp]
pub fn clb_xdp(ctx: XdpContext) -> u32 {
    let action = if let Some(ip) = parse::ipv4(&ctx) {
        process4(&ctx, ip)
    } else if parse6::ipv6(&ctx).is_some() {
        tail(&ctx, TAIL_V6)
    } else {
        xdp_action::XDP_PASS
    };
    finish(&ctx, action)
}

/// IPv6 packets (tail-called from [`clb_xdp`]).
#[xdp]
pub fn clb_xdp6(ctx: XdpContext) -> u32 {
    let action = match parse6::ipv6(&ctx) {
        Some(ip) => process6(&ctx, ip),
        None => xdp_action::XDP_PASS,
    };
    finish(&ctx, action)
}

/// ICMPv6 messages to a VIP (tail-called from [`clb_xdp6`]).
#[xdp]
pub fn clb_xdp6_icmp(ctx: XdpContext) -> u32 {
    let action = match parse6::ipv6(&ctx) {
        Some(ip) => icmp6::process(&ctx, ip),
        None => xdp_action::XDP_PASS,
    };
    finish(&ctx, action)
}

/// Later IPv6 fragments (tail-called from [`clb_xdp6`]): a noted reply datagram's are SNATed
/// to its VIP (`frag`); others to a VIP are dropped, the rest pass.
#[xdp]
pub fn clb_xdp6_frag(ctx: XdpContext) -> u32 {
    let action = match parse6::ipv6(&ctx) {
        Some(ip) => frag::later6(&ctx, ip),
        None => xdp_action::XDP_PASS,
    };
    finish(&ctx, action)
}

/// Passes every packet: attached to veth peers so `XDP_TX`/redirected frames are delivered,
/// and the floor the benchmarks measure against.
#[xdp]
pub fn clb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Counts a program's final verdict.
#[inline(always)]
fn finish(ctx: &XdpContext, action: u32) -> u32 {
    #[cfg(feature = "debug-log")]
    if action == xdp_action::XDP_DROP || action == xdp_action::XDP_TX {
        aya_log_ebpf::debug!(ctx, "clb: verdict {} (1 drop, 3 RST sent)", action);
    }
    #[cfg(not(feature = "debug-log"))]
    let _ = ctx;
    stats::count(match action {
        xdp_action::XDP_PASS => counter::VERDICT_PASS,
        xdp_action::XDP_DROP => counter::VERDICT_DROP,
        xdp_action::XDP_TX => counter::VERDICT_TX,
        xdp_action::XDP_REDIRECT => counter::VERDICT_REDIRECT,
        _ => counter::VERDICT_ABORTED,
    });
    action
}

/// Tail-calls program `index` of the program array. It returns only if the call failed (the
/// slot is empty: user space has not filled it): the packet then passes, counted.
#[inline(always)]
fn tail(ctx: &XdpContext, index: u32) -> u32 {
    // SAFETY: a tail call into a program of the same type, set by user space.
    unsafe { CLB_PROGS_V1.tail_call(ctx, index) };
    stats::count(counter::TAIL_CALL_FAILED);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop(reason: u32) -> u32 {
    stats::count(reason);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn process4(ctx: &XdpContext, ip: *mut Ipv4Hdr) -> u32 {
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
                // A client's fragment: clb balances whole datagrams only.
                Some(_) if frag::is_first(&p) => drop(counter::DROP_FRAGMENT),
                Some(l) => forward::client_packet::<V4>(ctx, ip, &p, l.id),
                None => reply::backend_packet::<V4>(ctx, ip, &p),
            }
        }
        // Anything else: if it is addressed to a VIP, say why it is not balanced (malformed
        // → dropped with a reason; an ICMP error about a flow → to its backend; another
        // protocol → passed); otherwise not ours.
        None => {
            // A later fragment of a backend's reply whose first fragment was SNATed.
            let action = frag::follow4(ctx, ip);
            if action != frag::NOT_NOTED {
                return action;
            }
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

/// As [`process4`] for IPv6: ICMPv6 (neighbour discovery above all) and anything not to a VIP
/// pass untouched.
#[inline(always)]
fn process6(ctx: &XdpContext, ip: *mut Ipv6Hdr) -> u32 {
    let mut p = Pkt::<V6> {
        l4_off: 0,
        ip_len: 0,
        saddr: [0; 2],
        daddr: [0; 2],
        sport: 0,
        dport: 0,
        proto: 0,
        tcp_flags: 0,
    };
    let parsed = Parsed6::decode(parse6::parse(ctx, ip, &mut p));
    if let Parsed6::Packet = parsed {
        let key = ListenerKey6 {
            vip: p.daddr,
            port: p.dport,
            proto: p.proto,
            _pad: [0; 5],
        };
        // SAFETY: read-only use of a map value.
        return match unsafe { CLB_LSN_ADDR6_V1.get(&key) } {
            Some(_) if frag::is_first(&p) => drop(counter::DROP_FRAGMENT),
            Some(l) => forward::client_packet::<V6>(ctx, ip, &p, l.id),
            None => reply::backend_packet::<V6>(ctx, ip, &p),
        };
    }
    // A later fragment: perhaps of a backend's reply (in a program of its own: its state
    // does not fit this one's frame).
    if let Parsed6::Fragment { .. } = parsed {
        return tail(ctx, TAIL_V6_FRAG);
    }
    if !parse6::to_vip(ip) {
        return xdp_action::XDP_PASS;
    }
    match parsed {
        Parsed6::Icmp { .. } => tail(ctx, TAIL_V6_ICMP),
        Parsed6::Bad(reason) => drop(reason),
        Parsed6::Other | Parsed6::Packet | Parsed6::Fragment { .. } => xdp_action::XDP_PASS,
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
