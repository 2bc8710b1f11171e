//! NAT rewrite with incremental checksums, and forwarding: next hop (cached FIB lookup), TTL,
//! MACs, devmap. DSR forwarding is the same minus the rewrite.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use clb_common::{NH_TTL_NS, NextHop, PROTO_TCP, counter, nh_slot};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    csum,
    family::V4,
    maps::{CLB_DEVS_V1, CLB_FIB_SCRATCH_V1, CLB_NH_V1},
    parse::{IP_OFF, Pkt, ptr_at},
    stats,
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

pub use crate::family::End;

/// Rewrites one end's address and port (network byte order), updating the IPv4 checksum and
/// the TCP/UDP checksum (pseudo-header address + port) incrementally. A UDP checksum of 0
/// ("none") stays 0.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    p: &Pkt<V4>,
    end: End,
    addr: u32,
    port: u16,
) -> Result<(), ()> {
    let (old_addr, old_port) = match end {
        End::Dst => (p.daddr, p.dport),
        End::Src => (p.saddr, p.sport),
    };
    // SAFETY: `ip` was bounds-checked by the parser; the frame has not changed size since.
    unsafe {
        match end {
            End::Dst => (*ip).dst_addr = addr.to_ne_bytes(),
            End::Src => (*ip).src_addr = addr.to_ne_bytes(),
        }
        let c = csum::replace4(u16::from_ne_bytes((*ip).check), old_addr, addr);
        (*ip).check = c.to_ne_bytes();
    }
    l4(ctx, p.l4_off, p.proto, end, old_port, port, |c| {
        csum::replace4(c, old_addr, addr)
    })
}

/// Rewrites the TCP/UDP port at one end and the L4 checksum: `addr_delta` applies the
/// pseudo-header's address change, then the port change is applied. A UDP checksum of 0
/// ("none", IPv4 only) stays 0.
#[inline(always)]
pub fn l4(
    ctx: &XdpContext,
    l4_off: usize,
    proto: u8,
    end: End,
    old_port: u16,
    port: u16,
    addr_delta: impl Fn(u16) -> u16,
) -> Result<(), ()> {
    // SAFETY: the L4 header is bounds-checked by `ptr_at`.
    unsafe {
        if proto == PROTO_TCP {
            let tcp: *mut TcpHdr = ptr_at(ctx, l4_off)?;
            let c = csum::replace2(addr_delta(u16::from_ne_bytes((*tcp).check)), old_port, port);
            (*tcp).check = c.to_ne_bytes();
            match end {
                End::Dst => (*tcp).dest = port.to_ne_bytes(),
                End::Src => (*tcp).source = port.to_ne_bytes(),
            }
        } else {
            let udp: *mut UdpHdr = ptr_at(ctx, l4_off)?;
            let old = u16::from_ne_bytes((*udp).check);
            if old != 0 {
                let c = csum::replace2(addr_delta(old), old_port, port);
                (*udp).check = csum::udp_nonzero(c).to_ne_bytes();
            }
            match end {
                End::Dst => (*udp).dst = port.to_ne_bytes(),
                End::Src => (*udp).src = port.to_ne_bytes(),
            }
        }
    }
    Ok(())
}

/// Sends the (already rewritten) packet on towards `nh_dst` (network byte order: the packet's
/// destination, or with `dsr` the backend, while the packet keeps the VIP as destination):
/// the next hop (egress, MACs) from the per-CPU cache or a FIB lookup, then TTL decrement, MAC
/// rewrite and a devmap redirect. When the kernel cannot give a next hop right now (no
/// neighbour entry yet, no route, egress not in the devmap), the packet goes to the stack
/// unchanged but for the NAT, and the stack resolves or forwards it — except for DSR, where
/// the stack would route by the VIP: a DSR packet without a next hop is dropped (and one whose
/// backend is not on-link too: only L2 reaches it). Callers drop or pass TTL ≤ 1 first.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    p: &Pkt<V4>,
    nh_dst: u32,
    dsr: bool,
    now: u64,
) -> u32 {
    forward_or(ctx, ip, p, nh_dst, dsr, now, |mtu| {
        too_big(ctx, ip, p, mtu, now)
    })
}

/// [`forward`], with `over_mtu(mtu)` the action for a packet over the egress MTU.
#[inline(always)]
pub fn forward_or(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    p: &Pkt<V4>,
    nh_dst: u32,
    dsr: bool,
    now: u64,
    over_mtu: impl Fn(u16) -> u32,
) -> u32 {
    // SAFETY: `ip` is bounds-checked (see `rewrite`).
    let ttl = unsafe { (*ip).ttl };
    if ttl <= 1 {
        return xdp_action::XDP_PASS;
    }
    let slot = nh_slot(nh_dst);
    let Some(nh) = CLB_NH_V1.get_ptr_mut(slot) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot; nothing else writes it while the program runs here.
    let nh = unsafe { &mut *nh };
    if nh.dst == nh_dst && nh.expires_ns > now && nh.mtu != 0 {
        stats::count(counter::NEXTHOP_CACHED);
    } else {
        match fib(ctx, ip, p, nh_dst) {
            Err(TOO_BIG) => return over_mtu(fib_mtu()),
            Ok(found) => {
                *nh = NextHop {
                    dst: nh_dst,
                    expires_ns: now + NH_TTL_NS,
                    ..found
                };
            }
            // DSR: the stack would route by the VIP; drop (a no-route drop is counted already).
            Err(xdp_action::XDP_DROP) => return xdp_action::XDP_DROP,
            Err(_) if dsr => {
                stats::count(counter::DROP_DSR_NO_NEXTHOP);
                return xdp_action::XDP_DROP;
            }
            Err(action) => return action,
        }
    }
    if dsr && nh.onlink == 0 {
        stats::count(counter::DROP_DSR_NO_NEXTHOP);
        return xdp_action::XDP_DROP;
    }
    // A cached next hop skips the FIB's MTU check: the same check here (a redirect of a
    // frame over the egress MTU is dropped by the kernel without a word).
    if p.ip_len > nh.mtu {
        let mtu = nh.mtu;
        return over_mtu(mtu);
    }
    let (ifindex, src_mac, dst_mac) = (nh.ifindex, nh.src_mac, nh.dst_mac);
    emit(ctx, ifindex, src_mac, dst_mac, dsr, || {
        // SAFETY: as above. TTL and protocol share one 16-bit word of the header.
        unsafe {
            let old = u16::from_ne_bytes([ttl, (*ip).proto]);
            let new = u16::from_ne_bytes([ttl - 1, (*ip).proto]);
            (*ip).ttl = ttl - 1;
            (*ip).check = csum::replace2(u16::from_ne_bytes((*ip).check), old, new).to_ne_bytes();
        }
    })
}

/// The last step of forwarding, either family: the egress from the devmap (if it is not
/// there, the packet goes to the stack as it is, which must still see our MAC as destination
/// and the original TTL — or, for DSR, is dropped), then `decrement_ttl`, the MACs, redirect.
#[inline(always)]
pub fn emit(
    ctx: &XdpContext,
    ifindex: u32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    dsr: bool,
    decrement_ttl: impl FnOnce(),
) -> u32 {
    let action = match CLB_DEVS_V1.redirect(ifindex, u64::from(xdp_action::XDP_PASS)) {
        Ok(a) => a,
        Err(a) => {
            if dsr {
                stats::count(counter::DROP_DSR_NO_NEXTHOP);
                return xdp_action::XDP_DROP;
            }
            stats::count(counter::FWD_STACK_NO_DEV);
            return a;
        }
    };
    decrement_ttl();
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*eth).dst_addr = dst_mac;
        (*eth).src_addr = src_mac;
    }
    action
}

/// What a FIB lookup result means for the packet: `Ok` to go on, `Err(action)` otherwise
/// (counted). Shared by both families.
#[inline(always)]
pub fn fib_verdict(rc: i64) -> Result<(), u32> {
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(()),
        // The stack finishes these: it resolves the neighbour (and forwards the packet),
        // or fragments it / answers "fragmentation needed". The packet goes up NATed.
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            stats::count(counter::FWD_STACK_NO_NEIGH);
            Err(xdp_action::XDP_PASS)
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            stats::count(counter::FWD_STACK_FRAG);
            Err(xdp_action::XDP_PASS)
        }
        // No route, blackhole, unreachable, prohibited, forwarding disabled: the stack
        // would drop it too.
        _ => {
            stats::count(counter::DROP_NO_ROUTE);
            Err(xdp_action::XDP_DROP)
        }
    }
}

/// The next hop towards `dst` per the kernel's FIB, or the action when there is none now.
#[inline(always)]
fn fib(ctx: &XdpContext, ip: *const Ipv4Hdr, p: &Pkt<V4>, dst: u32) -> Result<NextHop, u32> {
    // SAFETY: `fib` is this CPU's scratch slot (nothing else uses it while the program runs
    // here), a plain C struct for which all-zero is valid; the helper reads and writes only
    // it; `ip` is bounds-checked.
    unsafe {
        let Some(fib) = CLB_FIB_SCRATCH_V1.get_ptr_mut(0) else {
            return Err(xdp_action::XDP_ABORTED);
        };
        let fib = &mut *fib;
        *fib = core::mem::zeroed::<bpf_fib_lookup>();
        fib.family = AF_INET;
        fib.l4_protocol = p.proto;
        fib.__bindgen_anon_1.tot_len = p.ip_len;
        fib.__bindgen_anon_2.tos = (*ip).tos;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = dst;
        fib.ifindex = ctx.ingress_ifindex() as u32;
        let rc = fib_lookup(
            ctx.as_ptr(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        );
        if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
            return Err(TOO_BIG);
        }
        fib_verdict(rc)?;
        Ok(NextHop {
            mtu: fib.__bindgen_anon_1.mtu_result,
            ifindex: fib.ifindex,
            // The helper replaces the destination with the gateway when there is one.
            onlink: u8::from(fib.__bindgen_anon_4.ipv4_dst == dst),
            src_mac: fib.__bindgen_anon_6.__bindgen_anon_2.smac,
            dst_mac: fib.__bindgen_anon_6.__bindgen_anon_2.dmac,
            ..NextHop::default()
        })
    }
}

/// `fib`'s answer for a packet over the route's MTU (not an XDP action).
const TOO_BIG: u32 = u32::MAX;

/// The MTU the last FIB lookup on this CPU reported.
#[inline(always)]
fn fib_mtu() -> u16 {
    // SAFETY: this CPU's scratch slot, written by the lookup just before.
    match CLB_FIB_SCRATCH_V1.get_ptr(0) {
        Some(f) => unsafe { (*f).__bindgen_anon_1.mtu_result },
        None => 0,
    }
}

/// Length of an ICMP "fragmentation needed" quoting a 20-byte IPv4 header and 8 bytes.
const FRAG_NEEDED_IP_LEN: usize = Ipv4Hdr::LEN + 8 + Ipv4Hdr::LEN + 8;

/// A packet over the egress MTU `mtu`. With don't-fragment set, clb answers its sender with
/// an ICMP "fragmentation needed" (type 3 code 4, next-hop MTU) sent back out the ingress,
/// quoting the packet as its sender sent it: the addresses and ports of `p`, taken before the
/// NAT — the stack would quote the rewritten packet (the backend's address, on the client's
/// side), which the sender cannot match to its socket, and path-MTU discovery would stall.
/// Within the RST budget (clb answers no faster than it resets). Without don't-fragment the
/// packet goes to the stack, which fragments it (the fragments carry the rewritten header).
// A subprogram: written out once instead of at every inlined `forward` (the program stays
// within the verifier's 16-bit jump range).
#[inline(never)]
fn too_big(ctx: &XdpContext, ip: *mut Ipv4Hdr, p: &Pkt<V4>, mtu: u16, now: u64) -> u32 {
    // SAFETY: `ip` is bounds-checked (see `rewrite`).
    let (vihl, frags, proto) =
        unsafe { ((*ip).vihl, u16::from_be_bytes((*ip).frags), (*ip).proto) };
    // `p` describes this packet's own TCP/UDP header (not an ICMP error forwarded to a
    // backend, whose `p` is the quoted flow: the stack answers for those).
    if frags & 0x4000 == 0
        || vihl != 0x45
        || mtu < 68
        || proto != p.proto
        || (proto != PROTO_TCP && proto != clb_common::PROTO_UDP)
    {
        stats::count(counter::FWD_STACK_FRAG);
        return xdp_action::XDP_PASS;
    }
    if !crate::flood::take_rst(now) {
        stats::count(counter::DROP_RST_RATE);
        return xdp_action::XDP_DROP;
    }
    // The quote: the IP header as it is now but for the addresses (its checksum moved with
    // them), and the first 8 bytes of the transport header with the original ports.
    let Ok(l4) = ptr_at::<[u8; 8]>(ctx, IP_OFF + Ipv4Hdr::LEN) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: both bounds-checked.
    let (mut hdr, mut l4) = unsafe { (*ip, *l4) };
    let (cur_src, cur_dst) = (
        u32::from_ne_bytes(hdr.src_addr),
        u32::from_ne_bytes(hdr.dst_addr),
    );
    let c = csum::replace4(u16::from_ne_bytes(hdr.check), cur_src, p.saddr);
    hdr.check = csum::replace4(c, cur_dst, p.daddr).to_ne_bytes();
    hdr.src_addr = p.saddr.to_ne_bytes();
    hdr.dst_addr = p.daddr.to_ne_bytes();
    let (sp, dp) = (p.sport.to_ne_bytes(), p.dport.to_ne_bytes());
    l4[0] = sp[0];
    l4[1] = sp[1];
    l4[2] = dp[0];
    l4[3] = dp[1];

    let delta = (IP_OFF + FRAG_NEEDED_IP_LEN) as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the helper only resizes the frame; all pointers are re-derived after it.
    if delta != 0 && unsafe { aya_ebpf::helpers::bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return xdp_action::XDP_DROP;
    }
    let (Ok(eth), Ok(out), Ok(icmp), Ok(inner), Ok(inner_l4)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, IP_OFF),
        ptr_at::<[u8; 8]>(ctx, IP_OFF + Ipv4Hdr::LEN),
        ptr_at::<Ipv4Hdr>(ctx, IP_OFF + Ipv4Hdr::LEN + 8),
        ptr_at::<[u8; 8]>(ctx, IP_OFF + 2 * Ipv4Hdr::LEN + 8),
    ) else {
        return xdp_action::XDP_DROP;
    };
    let word = |b: [u8; 2]| u32::from(u16::from_ne_bytes(b));
    let addr = |a: u32| u32::from(a as u16) + u32::from((a >> 16) as u16);
    let mtu_b = mtu.to_be_bytes();
    // SAFETY: all bounds-checked just above against the new frame end.
    unsafe {
        core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr);
        *inner = hdr;
        *inner_l4 = l4;
        // ICMP checksum over type/code, MTU and the quote (its header summed word by word:
        // a sender's header checksum may be wrong, the ICMP one may not).
        // SAFETY: `Ipv4Hdr` is 20 plain bytes.
        let hb: [u8; Ipv4Hdr::LEN] = core::mem::transmute(hdr);
        let mut quoted = 0u32;
        let mut i = 0;
        while i < Ipv4Hdr::LEN {
            quoted += word([hb[i], hb[i + 1]]);
            i += 2;
        }
        let sum = quoted
            + word([3, 4])
            + word(mtu_b)
            + word([l4[0], l4[1]])
            + word([l4[2], l4[3]])
            + word([l4[4], l4[5]])
            + word([l4[6], l4[7]]);
        let c = !csum::fold(sum);
        let cb = c.to_ne_bytes();
        *icmp = [3, 4, cb[0], cb[1], 0, 0, mtu_b[0], mtu_b[1]];
        let len = (FRAG_NEEDED_IP_LEN as u16).to_be_bytes();
        (*out).vihl = 0x45;
        (*out).tos = 0xc0;
        (*out).tot_len = len;
        (*out).id = [0, 0];
        (*out).frags = [0, 0];
        (*out).ttl = 64;
        (*out).proto = 1;
        (*out).src_addr = p.daddr.to_ne_bytes();
        (*out).dst_addr = p.saddr.to_ne_bytes();
        let sum = word([0x45, 0xc0]) + word(len) + word([64, 1]) + addr(p.daddr) + addr(p.saddr);
        (*out).check = (!csum::fold(sum)).to_ne_bytes();
    }
    stats::count(counter::FRAG_NEEDED_SENT);
    xdp_action::XDP_TX
}
