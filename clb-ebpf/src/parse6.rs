//! IPv6 parsing: the fixed header, then at most `MAX_EXT_HEADERS` hop-by-hop and destination
//! options headers skipped, then a fragment header, then the transport header. A fragment
//! means no ports to balance on (a backend's fragmented UDP reply is followed by `frag`); a
//! routing header, too many or truncated extension headers make the packet
//! unparseable; so does a UDP checksum of 0 (illegal over IPv6). All are dropped (with a
//! reason) if the packet is addressed to a VIP.

use aya_ebpf::programs::XdpContext;
use clb_common::{
    ListenerKey6, MAX_EXT_HEADERS, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, counter, ip6_to_be,
};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    family::V6,
    maps::CLB_LSN_ADDR6_V1,
    parse::{IP_OFF, Pkt, ports, ptr_at},
};

/// EtherType IPv6 as it sits in memory.
const ETH_P_IPV6: u16 = u16::from_ne_bytes([0x86, 0xdd]);
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Offset of the first header after the fixed IPv6 header.
pub const L4_OFF6: usize = IP_OFF + Ipv6Hdr::LEN;

/// The IPv6 header of an Ethernet/IPv6 frame, or `None` for anything else.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext) -> Option<*mut Ipv6Hdr> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok()?;
    // SAFETY: `ptr_at` checked the frame holds an `EthHdr` here.
    if unsafe { (*eth).ether_type } != ETH_P_IPV6 {
        return None;
    }
    ptr_at(ctx, IP_OFF).ok()
}

/// What an IPv6 packet carries ([`parse`]'s answer).
pub enum Parsed6 {
    /// A well-formed TCP or UDP packet (in the `Pkt` [`parse`] filled).
    Packet,
    /// An ICMPv6 message at this offset; the packet ends at `end`.
    Icmp { off: usize, end: usize },
    /// Another upper-layer protocol (passed to the stack).
    Other,
    /// A later fragment (offset > 0) of a datagram with this identification (network byte
    /// order) and upper-layer protocol: perhaps of a backend's reply (see `frag`); dropped if
    /// it goes to a VIP.
    Fragment { id: u32, proto: u8 },
    /// Malformed, fragmented or unparseable: this drop reason if it goes to a VIP.
    Bad(u32),
}

/// [`parse`]'s answer as one register: the kind in the top byte, then the ICMPv6 offset and
/// end (or the drop reason).
const PACKET: u64 = 0;
const ICMP: u64 = 1 << 56;
const OTHER: u64 = 2 << 56;
const BAD: u64 = 3 << 56;
const FRAGMENT: u64 = 4 << 56;

impl Parsed6 {
    #[inline(always)]
    pub fn decode(v: u64) -> Self {
        match v & (0xff << 56) {
            PACKET => Parsed6::Packet,
            ICMP => Parsed6::Icmp {
                off: (v & 0xffff) as usize,
                end: ((v >> 16) & 0xffff) as usize,
            },
            OTHER => Parsed6::Other,
            FRAGMENT => Parsed6::Fragment {
                id: v as u32,
                proto: (v >> 32) as u8,
            },
            _ => Parsed6::Bad(v as u32),
        }
    }
}

/// Parses an IPv6 packet (`ip` bounds-checked by [`ipv6`]) into `out` (a TCP/UDP packet) and
/// says what it is (see [`Parsed6::decode`]).
#[inline(always)]
pub fn parse(ctx: &XdpContext, ip: *const Ipv6Hdr, out: &mut Pkt<V6>) -> u64 {
    // SAFETY: `ip` was bounds-checked for a full `Ipv6Hdr`.
    let (v, payload_len, first) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len) as usize,
            (*ip).next_hdr,
        )
    };
    if v != 6 {
        return BAD | u64::from(counter::DROP_BAD_VERSION);
    }
    let frame_len = ctx.data_end() - ctx.data();
    let end = L4_OFF6 + payload_len;
    if end > frame_len {
        return BAD | u64::from(counter::DROP_TRUNCATED_IP);
    }
    let (mut nh, mut off) = (first, L4_OFF6);
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match nh {
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let Ok(h) = ptr_at::<[u8; 2]>(ctx, off) else {
                    return BAD | u64::from(counter::DROP_BAD_EXTHDR);
                };
                // SAFETY: bounds-checked by `ptr_at`.
                let (next, len) = unsafe { ((*h)[0], (usize::from((*h)[1]) + 1) * 8) };
                let next_off = off + len;
                if next_off > end || next_off >= 0x4000 {
                    return BAD | u64::from(counter::DROP_BAD_EXTHDR);
                }
                // Bounded for the verifier (checked just above).
                off = next_off & 0x3fff;
                nh = next;
            }
            _ => break,
        }
        i += 1;
    }
    // A fragment header: a later fragment has no ports (its identification may still say
    // whose reply it is); a UDP datagram's first fragment is parsed on, marked as one.
    let mut first_fragment = false;
    if nh == NEXTHDR_FRAGMENT {
        let Ok(f) = ptr_at::<[u8; 8]>(ctx, off) else {
            return BAD | u64::from(counter::DROP_BAD_EXTHDR);
        };
        // SAFETY: bounds-checked by `ptr_at`.
        let (next, offset, id) = unsafe {
            (
                (*f)[0],
                u16::from_be_bytes([(*f)[2], (*f)[3]]) & 0xfff8,
                u32::from_ne_bytes([(*f)[4], (*f)[5], (*f)[6], (*f)[7]]),
            )
        };
        if offset != 0 {
            return FRAGMENT | (u64::from(next) << 32) | u64::from(id);
        }
        if next != PROTO_UDP || off + 8 > end {
            return BAD | u64::from(counter::DROP_FRAGMENT);
        }
        first_fragment = true;
        off = (off + 8) & 0x3fff;
        nh = next;
    }
    match nh {
        PROTO_TCP | PROTO_UDP => match ports(ctx, off, end - off, nh) {
            Ok((sport, dport, tcp_flags)) => {
                if nh == PROTO_UDP {
                    let Ok(u) = ptr_at::<[u8; 8]>(ctx, off) else {
                        return BAD | u64::from(counter::DROP_TRUNCATED_L4);
                    };
                    // SAFETY: bounds-checked by `ptr_at`.
                    if unsafe { (*u)[6] == 0 && (*u)[7] == 0 } {
                        return BAD | u64::from(counter::DROP_UDP6_ZERO_CSUM);
                    }
                }
                // SAFETY: as above.
                let (src, dst) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
                *out = Pkt {
                    l4_off: off,
                    ip_len: (Ipv6Hdr::LEN + payload_len).min(usize::from(u16::MAX)) as u16,
                    saddr: ip6_to_be(src),
                    daddr: ip6_to_be(dst),
                    sport,
                    dport,
                    proto: nh,
                    tcp_flags: if first_fragment {
                        crate::frag::UDP_FIRST_FRAGMENT
                    } else {
                        tcp_flags
                    },
                };
                PACKET
            }
            Err(()) => BAD | u64::from(counter::DROP_TRUNCATED_L4),
        },
        PROTO_ICMPV6 => ICMP | (off as u64 & 0xffff) | ((end as u64 & 0xffff) << 16),
        // A routing header (the destination may not be final), or still an options header
        // after the bound.
        NEXTHDR_ROUTING | NEXTHDR_HOP | NEXTHDR_DEST => BAD | u64::from(counter::DROP_BAD_EXTHDR),
        _ => OTHER,
    }
}

/// Whether the packet's destination is a VIP (`ip` bounds-checked by [`ipv6`]).
#[inline(always)]
pub fn to_vip(ip: *const Ipv6Hdr) -> bool {
    // SAFETY: bounds-checked by `ipv6`.
    let marker = ListenerKey6 {
        vip: ip6_to_be(unsafe { (*ip).dst_addr }),
        port: 0,
        proto: 0,
        _pad: [0; 5],
    };
    // SAFETY: read-only use of a map value.
    unsafe { CLB_LSN_ADDR6_V1.get(&marker) }.is_some()
}
