//! Header parsing. Every read goes through [`ptr_at`], the one bounds-checked accessor.
//!
//! Helpers return `Ok(value)` to keep going or `Err(Verdict)` with the final action; the caller
//! returns that at once (katran's `pckt_parsing.h` shape).

use aya_ebpf::programs::XdpContext;
use clb_common::{PROTO_TCP, PROTO_UDP, counter};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

pub use crate::family::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::{Verdict, family::V4};

/// EtherType IPv4 as it sits in memory.
const ETH_P_IP: u16 = u16::from_ne_bytes([0x08, 0x00]);
/// Offset of the IPv4 header (no VLAN support: tagged frames are not IPv4 and pass).
pub const IP_OFF: usize = EthHdr::LEN;

/// A pointer to a `T` at `off` bytes into the frame, or `Err` if the frame is shorter.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

/// The IPv4 header of an Ethernet/IPv4 frame with at least a 20-byte header, or `None` for
/// anything else (non-IPv4 or too short to say where it goes: both go to the stack).
#[inline(always)]
pub fn ipv4(ctx: &XdpContext) -> Option<*mut Ipv4Hdr> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok()?;
    // SAFETY: `ptr_at` checked the frame holds an `EthHdr` here.
    if unsafe { (*eth).ether_type } != ETH_P_IP {
        return None;
    }
    ptr_at(ctx, IP_OFF).ok()
}

/// Outcome of parsing a packet's L4 header.
pub enum L4 {
    /// A well-formed TCP or UDP packet.
    Packet,
    /// Not TCP/UDP (ICMP, ...), with its IP protocol number.
    Other(u8),
}

/// Parses IPv4 + TCP/UDP strictly: the packet goes to a VIP, so anything malformed is dropped
/// with a reason (`Err(Verdict::Drop(reason))`). IPv4 options are skipped, not refused.
#[inline(always)]
pub fn l4_strict(ctx: &XdpContext, ip: *const Ipv4Hdr) -> Result<L4, Verdict> {
    // SAFETY: `ip` was bounds-checked for a full `Ipv4Hdr` by `ipv4`.
    let (vihl, tot_len, frags, proto) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len),
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
        )
    };
    if vihl >> 4 != 4 {
        return Err(Verdict::Drop(counter::DROP_BAD_VERSION));
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < Ipv4Hdr::LEN {
        return Err(Verdict::Drop(counter::DROP_BAD_IHL));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(L4::Other(proto));
    }
    let frame_len = ctx.data_end() - ctx.data();
    if (tot_len as usize) < ihl || IP_OFF + tot_len as usize > frame_len {
        return Err(Verdict::Drop(counter::DROP_TRUNCATED_IP));
    }
    // More-fragments flag or a fragment offset: no ports to balance on.
    if frags & 0x3fff != 0 {
        return Err(Verdict::Drop(counter::DROP_FRAGMENT));
    }
    l4_ports(ctx, ip, ihl, tot_len, proto)
        .map(|_| L4::Packet)
        .map_err(|()| Verdict::Drop(counter::DROP_TRUNCATED_L4))
}

/// Parses IPv4 + TCP/UDP leniently for the reply path: anything odd is `None` (pass to stack).
#[inline(always)]
pub fn l4_lenient(ctx: &XdpContext, ip: *const Ipv4Hdr) -> Option<Pkt<V4>> {
    // SAFETY: as in `l4_strict`.
    let (vihl, tot_len, frags, proto) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len),
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    // A UDP datagram's first fragment (more-fragments, offset 0) has its ports: a backend's
    // fragmented reply (see `frag`). Any other fragment has none.
    let first_fragment = frags & 0x3fff == 0x2000 && proto == PROTO_UDP;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || (frags & 0x3fff != 0 && !first_fragment) {
        return None;
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let frame_len = ctx.data_end() - ctx.data();
    if (tot_len as usize) < ihl || IP_OFF + tot_len as usize > frame_len {
        return None;
    }
    let mut p = l4_ports(ctx, ip, ihl, tot_len, proto).ok()?;
    if first_fragment {
        p.tcp_flags = crate::frag::UDP_FIRST_FRAGMENT;
    }
    Some(p)
}

#[inline(always)]
fn l4_ports(
    ctx: &XdpContext,
    ip: *const Ipv4Hdr,
    ihl: usize,
    tot_len: u16,
    proto: u8,
) -> Result<Pkt<V4>, ()> {
    // SAFETY: checked by the caller.
    let (saddr, daddr) = unsafe {
        (
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    // `ihl` is at most 60: the verifier sees a bounded offset.
    let l4_off = IP_OFF + (ihl & 0x3c);
    let l4_len = tot_len as usize - ihl;
    let mut pkt = Pkt::<V4> {
        l4_off,
        ip_len: tot_len,
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
    };
    (pkt.sport, pkt.dport, pkt.tcp_flags) = ports(ctx, l4_off, l4_len, proto)?;
    Ok(pkt)
}

/// Source port, destination port and TCP flags of the TCP or UDP header at `l4_off`, which
/// must fit in `l4_len` bytes (the IP payload).
#[inline(always)]
pub fn ports(
    ctx: &XdpContext,
    l4_off: usize,
    l4_len: usize,
    proto: u8,
) -> Result<(u16, u16, u8), ()> {
    if proto == PROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, l4_off)?;
        if l4_len < TcpHdr::LEN {
            return Err(());
        }
        // SAFETY: `ptr_at` checked the frame holds a `TcpHdr` here.
        unsafe {
            let doff = ((*(tcp as *const u8).add(12)) >> 4) as usize * 4;
            if doff < TcpHdr::LEN || doff > l4_len {
                return Err(());
            }
            Ok((
                u16::from_ne_bytes((*tcp).source),
                u16::from_ne_bytes((*tcp).dest),
                *(tcp as *const u8).add(13),
            ))
        }
    } else {
        let udp: *const UdpHdr = ptr_at(ctx, l4_off)?;
        if l4_len < UdpHdr::LEN {
            return Err(());
        }
        // SAFETY: `ptr_at` checked the frame holds a `UdpHdr` here.
        unsafe {
            Ok((
                u16::from_ne_bytes((*udp).src),
                u16::from_ne_bytes((*udp).dst),
                0,
            ))
        }
    }
}
