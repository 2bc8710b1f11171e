//! ICMP errors about a flow, addressed to a VIP: a router between clb and the client that
//! cannot forward a backend's reply (fragmentation needed, unreachable, time exceeded) answers
//! to the reply's source, the VIP. Its payload quotes the reply's headers (VIP:port →
//! client:port). clb finds the flow and hands the error to the flow's backend, so path-MTU
//! discovery works through the balancer: on NAT listeners the outer destination and the quoted
//! source become the backend's (with the quoted IP header checksum, the quoted L4 checksum
//! where quoted, and the ICMP checksum updated); on DSR listeners the backend holds the VIP
//! and gets the error unchanged but for the MACs.
//!
//! Only errors with 20-byte outer and quoted IPv4 headers are handled (routers send no
//! options); anything else to a VIP passes to the stack, as do errors about unknown flows.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use clb_common::{LISTENER_F_DSR, ListenerKey, PROTO_TCP, PROTO_UDP, counter};
use network_types::ip::Ipv4Hdr;

use crate::{
    backends, conntrack, csum, drop,
    family::V4,
    forward::Flow,
    halfopen,
    maps::{CLB_LSN_ADDR_V1, CLB_LSN_V2},
    nat,
    parse::{IP_OFF, Pkt, ptr_at},
    stats,
};

/// ICMP types that quote the offending packet.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

const ICMP_OFF: usize = IP_OFF + Ipv4Hdr::LEN;
const INNER_IP_OFF: usize = ICMP_OFF + 8;
const INNER_L4_OFF: usize = INNER_IP_OFF + Ipv4Hdr::LEN;

/// Handles an ICMP packet to a VIP (parsed strictly, not a fragment).
#[inline(always)]
pub fn to_vip(ctx: &XdpContext, ip: *mut Ipv4Hdr) -> u32 {
    // SAFETY: `ip` was bounds-checked for a full `Ipv4Hdr` by the parser.
    let (vihl, ttl, tot_len) =
        unsafe { ((*ip).vihl, (*ip).ttl, u16::from_be_bytes((*ip).tot_len)) };
    if vihl != 0x45 || ttl <= 1 {
        return xdp_action::XDP_PASS;
    }
    // Everything read or rewritten must lie within the ICMP message (the IP total length),
    // not merely within the frame (trailing bytes are padding the checksum does not cover).
    let ip_end = IP_OFF + tot_len as usize;
    let Ok(icmp) = ptr_at::<[u8; 8]>(ctx, ICMP_OFF) else {
        return drop(counter::DROP_BAD_ICMP);
    };
    // SAFETY: bounds-checked by `ptr_at`.
    let kind = unsafe { (*icmp)[0] };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETERPROB {
        return xdp_action::XDP_PASS;
    }
    if ip_end < INNER_L4_OFF + 4 {
        return drop(counter::DROP_BAD_ICMP);
    }
    let (Ok(inner), Ok(ports)) = (
        ptr_at::<Ipv4Hdr>(ctx, INNER_IP_OFF),
        ptr_at::<[u16; 2]>(ctx, INNER_L4_OFF),
    ) else {
        return drop(counter::DROP_BAD_ICMP);
    };
    // SAFETY: both bounds-checked by `ptr_at`.
    let (ivihl, iproto, isrc, idst, [isport, idport], outer_dst) = unsafe {
        (
            (*inner).vihl,
            (*inner).proto,
            u32::from_ne_bytes((*inner).src_addr),
            u32::from_ne_bytes((*inner).dst_addr),
            *ports,
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    if ivihl != 0x45 || (iproto != PROTO_TCP && iproto != PROTO_UDP) || isrc != outer_dst {
        return xdp_action::XDP_PASS;
    }
    // The quoted packet is a reply: VIP:port → client:port.
    let lkey = ListenerKey {
        vip: isrc,
        port: isport,
        proto: iproto,
        _pad: 0,
    };
    // SAFETY: read-only use of a map value.
    let Some(id) = (unsafe { CLB_LSN_ADDR_V1.get(&lkey) }).map(|l| l.id) else {
        return xdp_action::XDP_PASS;
    };
    let Some(lsn) = CLB_LSN_V2.get(id) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = Flow::<V4> {
        client: idst,
        client_port: idport,
        proto: iproto,
    }
    .key(id);
    let backend = match conntrack::live::<V4>(&key, lsn, now) {
        Some(c) => c.backend,
        None => match halfopen::live::<V4>(&key, now) {
            Some(h) => u32::from(h.val().backend),
            None => return xdp_action::XDP_PASS,
        },
    };
    let Some(be) = backends::present(backend) else {
        return xdp_action::XDP_PASS;
    };
    stats::count(counter::ICMP_NATED);
    // `forward` needs a parsed view for the FIB lookup only: protocol and length.
    // SAFETY: as above.
    let ip_len = u16::from_be_bytes(unsafe { (*ip).tot_len });
    let view = Pkt::<V4> {
        l4_off: ICMP_OFF,
        ip_len,
        saddr: 0,
        daddr: outer_dst,
        sport: 0,
        dport: 0,
        proto: clb_common::PROTO_ICMP,
        tcp_flags: 0,
    };
    if lsn.flags & LISTENER_F_DSR != 0 {
        return nat::forward(ctx, ip, &view, be.addr, true, now);
    }
    if rewrite(
        ctx, ip, ip_end, inner, iproto, isrc, isport, be.addr, be.port,
    )
    .is_err()
    {
        return drop(counter::DROP_BAD_ICMP);
    }
    nat::forward(ctx, ip, &view, be.addr, false, now)
}

/// Outer destination and quoted source VIP:port → backend, with every checksum that covers
/// them: the outer IP header's, the quoted IP header's, the quoted L4 checksum where the quote
/// reaches it, and the ICMP checksum (which covers the whole quote).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the fields of one packet")]
fn rewrite(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    ip_end: usize,
    inner: *mut Ipv4Hdr,
    iproto: u8,
    vip: u32,
    vip_port: u16,
    addr: u32,
    port: u16,
) -> Result<(), ()> {
    let icmp: *mut [u8; 8] = ptr_at(ctx, ICMP_OFF)?;
    let ports: *mut [u16; 2] = ptr_at(ctx, INNER_L4_OFF)?;
    // SAFETY: every pointer was bounds-checked by `ptr_at` (here or by the caller).
    unsafe {
        (*ip).dst_addr = addr.to_ne_bytes();
        (*ip).check = csum::replace4(u16::from_ne_bytes((*ip).check), vip, addr).to_ne_bytes();

        let mut icmp_sum = u16::from_ne_bytes([(*icmp)[2], (*icmp)[3]]);
        // Quoted source address, and the quoted IP checksum that changes with it.
        (*inner).src_addr = addr.to_ne_bytes();
        icmp_sum = csum::replace4(icmp_sum, vip, addr);
        let old_ic = u16::from_ne_bytes((*inner).check);
        let new_ic = csum::replace4(old_ic, vip, addr);
        (*inner).check = new_ic.to_ne_bytes();
        icmp_sum = csum::replace2(icmp_sum, old_ic, new_ic);
        // Quoted source port.
        (*ports)[0] = port;
        icmp_sum = csum::replace2(icmp_sum, vip_port, port);
        // Quoted L4 checksum, if the quote reaches it (UDP: always; TCP: if 18+ bytes quoted).
        let check_off = if iproto == PROTO_TCP {
            INNER_L4_OFF + 16
        } else {
            INNER_L4_OFF + 6
        };
        if check_off + 2 <= ip_end
            && let Ok(c) = ptr_at::<[u8; 2]>(ctx, check_off)
        {
            let old = u16::from_ne_bytes(*c);
            if !(iproto == PROTO_UDP && old == 0) {
                let mut new = csum::replace4(old, vip, addr);
                new = csum::replace2(new, vip_port, port);
                if iproto == PROTO_UDP {
                    new = csum::udp_nonzero(new);
                }
                *c = new.to_ne_bytes();
                icmp_sum = csum::replace2(icmp_sum, old, new);
            }
        }
        let b = icmp_sum.to_ne_bytes();
        (*icmp)[2] = b[0];
        (*icmp)[3] = b[1];
    }
    Ok(())
}
