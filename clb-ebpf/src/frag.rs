//! Fragmented replies (NAT listeners). A backend's UDP answer larger than its link's MTU
//! leaves it in fragments; only the first carries the UDP header, the others only the IP
//! header with the datagram's identification. The first fragment is a reply like any other:
//! the reply path finds its flow by port and SNATs it to the VIP (the UDP checksum, which
//! covers the whole datagram, takes the address and port change incrementally, and sits in
//! the first fragment), and [`note4`] / [`note6`] record (backend, client, identification,
//! protocol) → VIP. A later fragment of a noted datagram gets the VIP as source ([`follow4`] /
//! [`follow6`]), so the client reassembles a datagram from the VIP — nothing with the
//! backend's address reaches it. Without reassembly and without state beyond the datagram.
//!
//! What this needs: the first fragment before the others (Linux sends a datagram's fragments
//! in order, back to back; a link keeps that order). A later fragment of no noted datagram is
//! passed to the stack as before (counted `frag_not_noted`: most are not clb's). Fragments a
//! client sends to a VIP are still dropped (`drop_fragment`): clb balances on ports.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use clb_common::{
    Addr6, FRAG_TTL_NS, FragKey, FragKey6, FragValue, FragValue6, PROTO_UDP, counter, ip6_from_be,
    ip6_to_be,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    csum,
    family::{Pkt, V4, V6},
    maps::{CLB_FRAG_V1, CLB_FRAG6_SCRATCH_V1, CLB_FRAG6_V1},
    nat, nat6,
    parse::{IP_OFF, ptr_at},
    parse6::{self, Parsed6},
    stats,
};

/// In a UDP packet's `tcp_flags` (0 otherwise): the packet is the first fragment of a
/// datagram (more-fragments set, offset 0), its UDP header here, its payload continued in
/// later fragments.
pub const UDP_FIRST_FRAGMENT: u8 = 0x80;

/// Records a SNATed IPv4 first fragment (`ip` still carries the backend as source: called
/// before the rewrite).
// A subprogram: its key and value would not fit the IPv4 program's frame beside the rest.
#[inline(never)]
pub fn note4(ip: *const Ipv4Hdr, vip: u32, listener: u32, backend: u32, now: u64) {
    // SAFETY: the parser bounds-checked the header.
    let key = unsafe {
        FragKey {
            src: u32::from_ne_bytes((*ip).src_addr),
            dst: u32::from_ne_bytes((*ip).dst_addr),
            id: u16::from_ne_bytes((*ip).id),
            proto: (*ip).proto,
            _pad: 0,
        }
    };
    let val = FragValue {
        expires_ns: now + FRAG_TTL_NS,
        vip,
        listener,
        backend,
        _pad: 0,
    };
    // An insert that fails (never for an LRU map, which evicts) leaves the later fragments
    // passed, as before: nothing else depends on it.
    if CLB_FRAG_V1.insert(&key, &val, 0).is_ok() {
        stats::count(counter::REPLY_FRAG_FIRST);
    }
}

/// Records a SNATed IPv6 first fragment: its fragment header sits just before the UDP header
/// (the parser marks only those first fragments). The entry is built in a per-CPU scratch
/// slot: the IPv6 reply path has no 72 bytes of stack to spare.
#[inline(always)]
pub fn note6(ctx: &XdpContext, p: &Pkt<V6>, vip: Addr6, listener: u32, backend: u32, now: u64) {
    // The identification: the fragment header's last four bytes (bounded for the verifier).
    let Ok(id) = ptr_at::<[u8; 4]>(ctx, p.l4_off.wrapping_sub(4) & 0x3fff) else {
        return;
    };
    let Some(e) = CLB_FRAG6_SCRATCH_V1.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot (nothing else uses it while the program runs here);
    // `id` is bounds-checked by `ptr_at`.
    unsafe {
        (*e).key = FragKey6 {
            src: p.saddr,
            dst: p.daddr,
            id: u32::from_ne_bytes(*id),
            proto: p.proto,
            _pad: [0; 3],
        };
        (*e).val = FragValue6 {
            expires_ns: now + FRAG_TTL_NS,
            vip,
            listener,
            backend,
        };
        if CLB_FRAG6_V1.insert(&(*e).key, &(*e).val, 0).is_ok() {
            stats::count(counter::REPLY_FRAG_FIRST);
        }
    }
}

/// [`follow4`]'s answer for a fragment that is not a noted reply's (not an XDP action).
pub const NOT_NOTED: u32 = u32::MAX;

/// A later IPv4 fragment (offset > 0): the action for it if it belongs to a noted reply
/// datagram (rewritten to come from the VIP and forwarded), [`NOT_NOTED`] otherwise.
// A subprogram: its state would not fit the IPv4 program's frame beside everything else.
#[inline(never)]
pub fn follow4(ctx: &XdpContext, ip: *mut Ipv4Hdr) -> u32 {
    // SAFETY: `parse::ipv4` bounds-checked a full header.
    let (vihl, tot_len, frags, proto, src, dst, id) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len),
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
            u16::from_ne_bytes((*ip).id),
        )
    };
    // SAFETY: as above.
    let ttl = unsafe { (*ip).ttl };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || frags & 0x1fff == 0 || proto != PROTO_UDP {
        return NOT_NOTED;
    }
    if (tot_len as usize) < ihl || IP_OFF + tot_len as usize > ctx.data_end() - ctx.data() {
        return NOT_NOTED;
    }
    let key = FragKey {
        src,
        dst,
        id,
        proto,
        _pad: 0,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: read-only use of a map value.
    let Some(v) = (unsafe { CLB_FRAG_V1.get(&key) }).filter(|v| v.expires_ns > now) else {
        stats::count(counter::FRAG_NOT_NOTED);
        return NOT_NOTED;
    };
    let (vip, listener, backend) = (v.vip, v.listener, v.backend);
    if ttl <= 1 {
        // The stack answers a TTL-expiring packet itself, as for the first fragment.
        return xdp_action::XDP_PASS;
    }
    // SAFETY: as above; the frame has not changed size.
    unsafe {
        (*ip).src_addr = vip.to_ne_bytes();
        (*ip).check = csum::replace4(u16::from_ne_bytes((*ip).check), src, vip).to_ne_bytes();
    }
    stats::count(counter::REPLY_FRAG_REWRITTEN);
    stats::reply(listener, backend, tot_len);
    let p = Pkt::<V4> {
        l4_off: IP_OFF + (ihl & 0x3c),
        ip_len: tot_len,
        saddr: vip,
        daddr: dst,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
    };
    // Over the egress MTU: a fragment has don't-fragment clear, the stack fragments it
    // further (with the VIP as source now).
    nat::forward_or(ctx, ip, &p, dst, false, now, |_| {
        stats::count(counter::FWD_STACK_FRAG);
        xdp_action::XDP_PASS
    })
}

/// A later IPv6 fragment (in [`clb_xdp6_frag`](crate::clb_xdp6_frag)): SNATed if its
/// datagram is a noted reply, dropped if it goes to a VIP, passed otherwise.
#[inline(always)]
pub fn later6(ctx: &XdpContext, ip: *mut Ipv6Hdr) -> u32 {
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
    if let Parsed6::Fragment { id, proto } = Parsed6::decode(parse6::parse(ctx, ip, &mut p))
        && let Some(action) = follow6(ctx, ip, id, proto)
    {
        return action;
    }
    if parse6::to_vip(ip) {
        stats::count(counter::DROP_FRAGMENT);
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// A later IPv6 fragment with identification `id` (network byte order) of upper protocol
/// `proto`: as [`follow4`].
#[inline(always)]
fn follow6(ctx: &XdpContext, ip: *mut Ipv6Hdr, id: u32, proto: u8) -> Option<u32> {
    if proto != PROTO_UDP {
        return None;
    }
    // SAFETY: `parse6::ipv6` bounds-checked a full header.
    let (src, dst, payload_len) = unsafe {
        (
            ip6_to_be((*ip).src_addr),
            ip6_to_be((*ip).dst_addr),
            u16::from_be_bytes((*ip).payload_len),
        )
    };
    let key = FragKey6 {
        src,
        dst,
        id,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: read-only use of a map value.
    let Some(v) = (unsafe { CLB_FRAG6_V1.get(&key) }).filter(|v| v.expires_ns > now) else {
        stats::count(counter::FRAG_NOT_NOTED);
        return None;
    };
    let (vip, listener, backend) = (v.vip, v.listener, v.backend);
    // SAFETY: as above. IPv6 has no header checksum, and a later fragment no L4 header.
    unsafe { (*ip).src_addr = ip6_from_be(vip) };
    let ip_len = (Ipv6Hdr::LEN + usize::from(payload_len)).min(usize::from(u16::MAX)) as u16;
    stats::count(counter::REPLY_FRAG_REWRITTEN);
    stats::reply(listener, backend, ip_len);
    let p = Pkt::<V6> {
        l4_off: IP_OFF + Ipv6Hdr::LEN,
        ip_len,
        saddr: vip,
        daddr: dst,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
    };
    let hop = nat6::Hop {
        dst,
        now,
        dsr: false,
    };
    Some(nat6::forward(ctx, ip, &p, &hop))
}

/// Whether this packet is a first fragment (see [`UDP_FIRST_FRAGMENT`]).
#[inline(always)]
pub fn is_first<F: crate::family::Family>(p: &Pkt<F>) -> bool {
    !p.is_tcp() && p.tcp_flags & UDP_FIRST_FRAGMENT != 0
}
