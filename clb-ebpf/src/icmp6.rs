//! ICMPv6 errors about a flow, addressed to a VIP (as `icmp` for IPv4): destination
//! unreachable, packet too big, time exceeded and parameter problem quote the reply that
//! caused them (VIP:port → client:port). clb hands the error to the flow's backend, so path-MTU
//! discovery works through the balancer: on NAT listeners the outer destination and the quoted
//! source become the backend's, with the quoted L4 checksum (where quoted) and the ICMPv6
//! checksum (over the pseudo-header and the whole message) updated; on DSR listeners only the
//! MACs change. Everything else — echo, neighbour discovery, errors about unknown flows or
//! quoting extension headers — passes to the stack untouched.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use clb_common::{
    LISTENER_F_DSR, ListenerKey6, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, addr6_eq, counter,
    ip6_from_be, ip6_to_be,
};
use network_types::ip::Ipv6Hdr;

use crate::{
    backends, conntrack, csum, drop,
    family::{Family, V6},
    halfopen,
    maps::{CLB_ICMP6_SCRATCH_V1, CLB_LSN_ADDR6_V1, CLB_LSN_V2, Quote},
    parse::ptr_at,
    parse6::{self, Parsed6},
    stats,
};

/// ICMPv6 error types (they quote the offending packet).
const DEST_UNREACH: u8 = 1;
const PACKET_TOO_BIG: u8 = 2;
const TIME_EXCEEDED: u8 = 3;
const PARAM_PROBLEM: u8 = 4;

/// Handles an IPv6 packet in the ICMPv6 program: an ICMPv6 message to a VIP goes to
/// [`to_vip`], anything else passes (the program is only tail-called for those).
#[inline(always)]
pub fn process(ctx: &XdpContext, ip: *mut Ipv6Hdr) -> u32 {
    let Some(q) = CLB_ICMP6_SCRATCH_V1.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot; nothing else uses it while the program runs here.
    let q = unsafe { &mut *q };
    match Parsed6::decode(parse6::parse(ctx, ip, &mut q.pkt)) {
        Parsed6::Icmp { off, end } if parse6::to_vip(ip) => {
            q.off = off;
            q.end = end;
            to_vip(ctx, ip, q)
        }
        _ => xdp_action::XDP_PASS,
    }
}

/// Handles the ICMPv6 message at `q.off` (the packet ends at `q.end`) to a VIP.
#[inline(always)]
fn to_vip(ctx: &XdpContext, ip: *mut Ipv6Hdr, q: &mut Quote) -> u32 {
    if V6::ttl(ip) <= 1 {
        return xdp_action::XDP_PASS;
    }
    match find(ctx, ip, q) {
        FOUND => {}
        PASS => return xdp_action::XDP_PASS,
        _ => return drop(counter::DROP_BAD_ICMP),
    }
    stats::count(counter::ICMP_NATED);
    // `forward` needs a parsed view for the FIB lookup only: protocol, length, source.
    q.pkt.l4_off = q.off;
    q.pkt.ip_len = (q.end - crate::parse::IP_OFF).min(usize::from(u16::MAX)) as u16;
    q.pkt.proto = PROTO_ICMPV6;
    // SAFETY: `ip` was bounds-checked by the parser.
    q.pkt.saddr = unsafe { ip6_to_be((*ip).src_addr) };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if q.dsr == 0 && rewrite(ctx, ip, q).is_err() {
        return drop(counter::DROP_BAD_ICMP);
    }
    V6::forward(ctx, ip, &q.pkt, q.addr, q.dsr != 0, now)
}

/// Bound of offsets kept in the scratch map.
const OFF_MASK: usize = 0x3fff;

const FOUND: u32 = 0;
const PASS: u32 = 1;
const BAD: u32 = 2;

/// Reads the quote and finds its flow's backend into `q`.
#[inline(always)]
fn find(ctx: &XdpContext, ip: *const Ipv6Hdr, q: &mut Quote) -> u32 {
    // Offsets read back from the map are unknown to the verifier: bound them (frames are
    // shorter than 16 KiB).
    let off = q.off & OFF_MASK;
    let Ok(icmp) = ptr_at::<[u8; 8]>(ctx, off) else {
        return BAD;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    let kind = unsafe { (*icmp)[0] };
    if kind != DEST_UNREACH
        && kind != PACKET_TOO_BIG
        && kind != TIME_EXCEEDED
        && kind != PARAM_PROBLEM
    {
        return PASS;
    }
    let inner_off = off + 8;
    q.inner_l4 = inner_off + Ipv6Hdr::LEN;
    if q.inner_l4 + 4 > q.end {
        return BAD;
    }
    // One bounds check for the quoted IPv6 header and ports together (two separate checks
    // would let the compiler drop the first as implied, which the verifier cannot follow).
    let Ok(quote) = ptr_at::<[u8; Ipv6Hdr::LEN + 4]>(ctx, inner_off) else {
        return BAD;
    };
    let inner = quote as *const Ipv6Hdr;
    // SAFETY: within the bounds-checked quote.
    let ports = unsafe { (quote as *const u8).add(Ipv6Hdr::LEN) } as *const [u16; 2];
    // Addresses are read from the packet where each is needed (not held across the map
    // lookups: spilled, sixteen bytes each would not fit the stack).
    // SAFETY: `inner`, `ports` and `ip` are bounds-checked.
    let iproto = unsafe { (*inner).next_hdr };
    if iproto != PROTO_TCP && iproto != PROTO_UDP {
        return PASS;
    }
    // SAFETY: as above.
    let quoted_vip = unsafe { ip6_to_be((*inner).src_addr) };
    // SAFETY: as above.
    if !addr6_eq(&quoted_vip, &unsafe { ip6_to_be((*ip).dst_addr) }) {
        return PASS;
    }
    let lkey = ListenerKey6 {
        vip: quoted_vip,
        // SAFETY: as above.
        port: unsafe { (*ports)[0] },
        proto: iproto,
        _pad: [0; 5],
    };
    // SAFETY: read-only use of a map value.
    let Some(id) = (unsafe { CLB_LSN_ADDR6_V1.get(&lkey) }).map(|l| l.id) else {
        return PASS;
    };
    let Some(lsn) = CLB_LSN_V2.get(id) else {
        return PASS;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    let key = V6::key(
        unsafe { ip6_to_be((*inner).dst_addr) },
        unsafe { (*ports)[1] },
        id,
        iproto,
    );
    let backend = match conntrack::live::<V6>(&key, lsn, now) {
        Some(c) => c.backend,
        None => match halfopen::live::<V6>(&key, now) {
            Some(h) => u32::from(h.val().backend),
            None => return PASS,
        },
    };
    let Some(be) = backends::present(backend) else {
        return PASS;
    };
    // SAFETY: as above.
    let (isrc, isport) = unsafe { (ip6_to_be((*inner).src_addr), (*ports)[0]) };
    q.iproto = iproto;
    q.vip = isrc;
    q.vip_port = isport;
    q.addr = V6::backend_addr(backend, be);
    q.port = be.port;
    q.dsr = u8::from(lsn.flags & LISTENER_F_DSR != 0);
    FOUND
}

/// Outer destination and quoted source VIP:port → backend, with the quoted L4 checksum (where
/// the quote reaches it) and the ICMPv6 checksum.
#[inline(always)]
fn rewrite(ctx: &XdpContext, ip: *mut Ipv6Hdr, q: &Quote) -> Result<(), ()> {
    let (off, inner_l4) = (q.off & OFF_MASK, q.inner_l4 & OFF_MASK);
    let icmp: *mut [u8; 8] = ptr_at(ctx, off)?;
    let quote: *mut [u8; Ipv6Hdr::LEN + 4] = ptr_at(ctx, off + 8)?;
    let inner = quote as *mut Ipv6Hdr;
    // SAFETY: within the bounds-checked quote.
    let ports = unsafe { (quote as *mut u8).add(Ipv6Hdr::LEN) } as *mut [u16; 2];
    let (vip, addr, vip_port, port) = (q.vip, q.addr, q.vip_port, q.port);
    // SAFETY: every pointer was bounds-checked by `ptr_at` (here or by the caller).
    unsafe {
        let mut sum = u16::from_ne_bytes([(*icmp)[2], (*icmp)[3]]);
        // Outer destination: in the ICMPv6 pseudo-header.
        (*ip).dst_addr = ip6_from_be(addr);
        sum = csum::replace16(sum, &vip, &addr);
        // Quoted source address and port: in the message.
        (*inner).src_addr = ip6_from_be(addr);
        sum = csum::replace16(sum, &vip, &addr);
        (*ports)[0] = port;
        sum = csum::replace2(sum, vip_port, port);
        // Quoted L4 checksum, if the quote reaches it.
        let check_off = if q.iproto == PROTO_TCP {
            inner_l4 + 16
        } else {
            inner_l4 + 6
        };
        if check_off + 2 <= q.end
            && let Ok(c) = ptr_at::<[u8; 2]>(ctx, check_off)
        {
            let old = u16::from_ne_bytes(*c);
            if !(q.iproto == PROTO_UDP && old == 0) {
                let mut new = csum::replace16(old, &vip, &addr);
                new = csum::replace2(new, vip_port, port);
                if q.iproto == PROTO_UDP {
                    new = csum::udp_nonzero(new);
                }
                *c = new.to_ne_bytes();
                sum = csum::replace2(sum, old, new);
            }
        }
        let b = sum.to_ne_bytes();
        (*icmp)[2] = b[0];
        (*icmp)[3] = b[1];
    }
    Ok(())
}
